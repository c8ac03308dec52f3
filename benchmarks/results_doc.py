"""docs/results.md, generated from the measured results in benchmarks/results/.

    python benchmarks/results_doc.py            # write docs/results.md (atomically)
    python benchmarks/results_doc.py --check    # exit 1 if docs/results.md differs from what would be written

Every number in the document is read from a results file; none is typed here. What a file does not say about itself
(its base model, the commit that added it, its command) is in REGISTRY, so a shallow clone generates the same document.
A results file that is missing, malformed or not in REGISTRY stops the script with one line naming it. No torch.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS, OUT = os.path.join(ROOT, "benchmarks", "results"), os.path.join(ROOT, "docs", "results.md")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its siblings, also when imported from elsewhere

from results_registry import COMPANION, REGISTRY  # noqa: E402
from results_sections import (Bad, Ctx, cd_dynamics, compare, embedded, gpu, gradients, pipeline, predicted, recipes,  # noqa: E402
                              spans, table)



def build(folder):
    ctx, files = Ctx(folder), sorted(os.listdir(folder))
    other = {n: COMPANION.sub(".json", n) for n in files if n not in REGISTRY and COMPANION.sub(".json", n) in REGISTRY}
    for n in [n for n in files if n not in REGISTRY and n not in other] + [n for n in REGISTRY if n not in files]:
        raise Bad(f"{ctx.path(n)}: " + ("missing" if n in REGISTRY else "not in REGISTRY (add its commit, base model, command)"))
    H = lambda title: lambda: [f"## {title}", ""]
    parts = [H("ShortFT against the baselines, along reward-quality frontiers"),
             lambda: embedded(ctx, "compare_frontier_ship_cpu.json", "compare_frontier_ship_cpu.md",
                              "classifier:ship: ShortFT with one LoRA, its two controls and two baselines"),
             lambda: embedded(ctx, "compare_frontier_draftk_cpu.json", "compare_frontier_draftk_cpu.md",
                              "classifier:ship: DRaFT-K's depth, K = 1 against K = 10"),
             lambda: embedded(ctx, "compare_frontier_ablations_cpu.json", "compare_frontier_ablations_cpu.md",
                              "classifier:ship: the ablations, one LoRA -> + T-LoRA -> + P-Training"),
             lambda: embedded(ctx, "compare_frontier_brightness_cpu.json", "compare_frontier_brightness_cpu.md",
                              "brightness: a smooth reward"),
             H("Gradient signal-to-noise: one batch's gradient against a held-out full gradient"),
             lambda: embedded(ctx, "grad_snr_cpu.json", "grad_snr_cpu_table.md", "On the comparison's CPU base"),
             H("The earlier protocol: one tuned lr per method, evaluator features"),
             lambda: compare(ctx, "compare_cpu_epsskip.json", "On the ε-skip CPU base of an earlier default"),
             lambda: compare(ctx, "compare_cpu.json", "On the old 900-step CPU base, with full backprop (checkpointed)"),
             lambda: compare(ctx, "compare_cpu_default.json", "On the old 900-step CPU base: the default methods, rerun"),
             H("Gradient fidelity, same batch: each method's gradient against the full DDIM-50 gradient of its own batch"),
             lambda: gradients(ctx, "gradients_h100_classroom.json", "On the classroom checkpoints (NVIDIA H100)"),
             lambda: gradients(ctx, "gradients_cpu_epsskip.json", "On the ε-skip CPU base (its shortcut does not distil)"),
             H("P-Training: ShortFT with and without it"),
             lambda: compare(ctx, "ptrain_cpu.json", "Both at ShortFT's tuned lr, scored along training", curves=True),
             H("The shortcut"), lambda: spans(ctx, [f"shortcut_spans_{k}_cpu.txt" for k in (
                 "frontierbase", "epsskip", "epsskip_ema95", "epsskip_pipeline", "default", "default_ema95")]),
             lambda: cd_dynamics(ctx, [f"cd_dynamics_cpu_{k}.json" for k in ("lr1e-3", "epsskip_lowlr", "epsskip_ema95")]),
             H("One GPU, measured"), lambda: gpu(ctx), lambda: predicted(ctx),
             H("The hot loops: aten ops and host syncs per step, before and after removing the syncs"),
             lambda: embedded(ctx, "hotloops_cpu.json", "hotloops_cpu.md",
                                    "Counted on the CPU for the `gpu` preset's UNet layout (a sync: a device-to-host read, "
                                    "or a tensor built from Python data; Adam as CUDA runs it, foreach), and the CPU "
                                    "preset's step times on one thread"),
             H("The whole CPU pipeline, timed"),
             lambda: pipeline(ctx, "pipeline_cpu_default30", "Today's defaults, on the comparison's base"),
             lambda: pipeline(ctx, "pipeline_cpu_default", "The defaults before the frontier (60 steps), on an earlier base"),
             lambda: pipeline(ctx, "pipeline_cpu_old", "The old defaults (the 900-step base)"),
             lambda: pipeline(ctx, "pipeline_cpu_quick", "The 10-minute start: `--preset=quick`"), lambda: recipes(ctx)]
    out = ["# Measured results", "", "Every measured table of this project, generated from the results files in "
           "`benchmarks/results/` by `python benchmarks/results_doc.py`: do not edit this file by hand (a test regenerates it "
           "and fails on any difference). Each table names its results file, the base model it was measured on, the commit "
           "that added the file and the command that produced it; every GPU table names the card and the torch version its "
           "file records. FD is the held-out evaluator's feature distance (not comparable to published FID). What the numbers "
           "show is in the README.", ""]
    for part in parts:
        try:
            out += part()
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise Bad(f"{ctx.path(ctx.last)}: unexpected content ({e.__class__.__name__}: {e})")
    figs = [(p, n) for n, s in (("gradients_h100_classroom.json", "_classroom"), ("gradients_cpu_epsskip.json", ""))
            for p in (f"grad_{k}{s}.png" for k in ("cosine", "per_call", "adjoint"))]
    figs = [(f"[{p}](../docs/{p})", f"`{n}`") for p, n in figs + [("compare_pareto_cpu.png", "compare_cpu.json"),
                                                                   ("ptrain_curves_cpu.png", "ptrain_cpu.json")]]
    out += ["## Figures drawn from these files (`python benchmarks/figures.py --only=grad,compare,ptrain`)", ""]
    out += table(["figure", "drawn from"], [list(f) for f in figs]) + ["", "## Every file in benchmarks/results/", ""]
    out += table(["file", "commit that added it", "what"], [
        [f"`{n}`", f"`{REGISTRY[other.get(n, n)][0]}`", f"the benchmark's own {'log' if n.endswith('.log') else 'tables'} of "
         f"`{other[n]}`" if n in other else "rendered above"] for n in files])
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be generated")
    p.add_argument("--results_dir", default=RESULTS, help="the results files (default: benchmarks/results)")
    p.add_argument("--out", default=OUT, help="the document (default: docs/results.md)")
    a = p.parse_args(argv)
    try:
        text = build(os.path.abspath(a.results_dir))
        if a.check and os.path.isfile(a.out) and open(a.out, encoding="utf-8").read() == text:
            return 0
        if a.check:
            raise Bad(f"{a.out} is not what the results files give: run python benchmarks/results_doc.py")
        tmp = os.path.join(os.path.dirname(os.path.abspath(a.out)), f".results_doc.{os.getpid()}.tmp")
        try:  # atomically: a temporary file in the same folder, then os.replace
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            os.replace(tmp, a.out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except (Bad, OSError, KeyboardInterrupt) as e:  # one line, naming the file (Ctrl-C: the document is unchanged)
        why = str(e) if isinstance(e, Bad) else f"{getattr(e, 'filename', None) or a.out}: {getattr(e, 'strerror', '')}"
        print("interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {why}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1 if a.check else 2
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
