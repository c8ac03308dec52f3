"""What the results files of benchmarks/results/ do not say about themselves: for each file, the commit that added
it, the base model it was measured on and its command (benchmarks/results_doc.py renders them). Data only."""
import re

OLD = ("old 900-step CPU base: the CPU preset before the ε skip (no ε skip, 900 DDPM steps; shortcut distilled with the "
       "stop-grad target, `cd_target_ema` 0): `python train_toy.py --stages=ddpm,shortcut,classifier --eps_skip=false "
       "--ddpm_steps=900 --cd_target_ema=0`")
EPS = ("10-minute ε-skip CPU base: the `new` training of `recipe_cpu_600s.json` (ε skip, 1700 DDPM steps; "
       "`python benchmarks/bench_recipe.py --variants=new ...`)")
EPS_SG = (EPS + ", with the shortcut the stop-grad target distilled from it (`python train_shortcut.py --out_dir=DIR "
          "--cd_target_ema=0`), which does not distil on this base")
SLOW = ", shortcut distilled with the slow target (`cd_target_ema` 0.95)"
DEFAULT = ("CPU preset, today's default base (ε skip, 1700 DDPM steps), trained by the timed default pipeline "
           "(`pipeline_cpu_default.md`)" + SLOW)
CLASSROOM = "classroom checkpoints (`checkpoints/`, 3.65M UNet)"
H100 = (CLASSROOM + ", on one NVIDIA H100 with torch 2.11 (from the README; the file itself records only the merge of the "
        "two runs, made on a CPU)")
RECIPE = "none shared: every row trains its own DDPM from scratch on the 2-core CPU, judged by the shipped held-out evaluator"
SPANS, CMP = "python benchmarks/bench_shortcut.py --out_dir=DIR --n=64", "python benchmarks/bench_compare.py --out_dir=DIR"
CD = "python benchmarks/cd_dynamics.py --models=DIR --lrs=... [--target_ema=0.95]"
GRAD = ("bash benchmarks/gpu_evidence.sh OUT (its grad section: python benchmarks/bench_gradients.py --models=OUT/models "
        "--device=cuda), two runs merged by python benchmarks/bench_gradients.py --from_results=A,B, at commit 734d99f "
        "(the study has since been rebuilt around held-out gradients: grad_snr_cpu.json)")
GPU = "python benchmarks/gpu.py --data_root=PATH/cifar10 --out=/tmp/gpuout"
FRONT = ("the comparison's CPU base, trained from scratch for it: `python train_toy.py --stages=ddpm,shortcut,classifier` "
         "(ε skip, 1700 DDPM steps, 300 shortcut steps with the slow target; the reward classifier and the evaluator by the "
         "same command in a second folder), with the shipped judge (`checkpoints/judge.safetensors`)")
NEW = "e44e1ba"  # the commit that added the comparison's frontier files
CMPF = ("python benchmarks/bench_compare.py --out_dir=DIR --rewards={} --methods={} --ablations= --lrs={} --inception=false"
        "{} (then its results.json and results.md copied here, re-rendered by today's benchmarks/frontier_report.py)")
HOT = "20ebc5a"  # the commit that added the hot-loop and GPU-preset files
HOTBASE = ("none trained: each stage's per-step counts and times come from tiny runs (a few steps from scratch) of the "
           "code of each tree, on the CPU")
REGISTRY = {  # file -> (commit that added it: git log --diff-filter=A; base model; command, None: the file has it)
    "compare_frontier_ship_cpu.json": (NEW, FRONT, CMPF.format("classifier:ship", "shortft,shortft_naive,shortft_perfect,"
                                                               "draft,drtune", "1e-3,2e-3,4e-3", "; the same with "
                                                               "--report_only --inception=true for the Inception table")),
    "compare_frontier_draftk_cpu.json": (NEW, FRONT, CMPF.format("classifier:ship", "shortft,draft,draft10",
                                                                 "1e-3,2e-3,4e-3", " --jobs=1")),
    "compare_frontier_brightness_cpu.json": (NEW, FRONT, CMPF.format("brightness", "shortft,shortft_naive,draft",
                                                                     "2e-3,4e-3", " --jobs=1")),
    "compare_frontier_ablations_cpu.json": (NEW, FRONT, CMPF.format("classifier:ship", "shortft,shortft_tlora,"
                                                                    "shortft_tlora_ptrain", "1e-3,2e-3", "")),
    "hotloops_cpu.json": (HOT, HOTBASE, "git worktree add --detach /tmp/hot_old 4ed06b8 (the code before); "
                          "OMP_NUM_THREADS=1 python benchmarks/bench_hotloops.py --trees=before=/tmp/hot_old,after=. "
                          "--data_root=PATH/cifar10 --repeats=2 --out=benchmarks/results/hotloops_cpu"),
    "gpu_preset_predicted_h200.json": (HOT, "none: a prediction from the H200 measurements of `gpu_h200.json` and "
                                       "`gpu_h200_fid.json`", "python benchmarks/gpu.py --predict=benchmarks/results/"
                                       "gpu_h200.json,benchmarks/results/gpu_h200_fid.json"),
    "pipeline_cpu_default30.md": (NEW, "the comparison's base (its stages complete in DIR, so the run is the shortft stage): "
                                  + FRONT, None),
    "pipeline_cpu_default30_shortft_metrics.json": (NEW, FRONT, None),
    "grad_snr_cpu.json": (NEW, FRONT, "OMP_NUM_THREADS=1 python benchmarks/bench_gradients.py --models=DIR "
                          "--rewards=classifier:ship,brightness --batch=8 --batches=6 --heldout=48 --eta=0.045 --threads=1"),
    "shortcut_spans_frontierbase_cpu.txt": (NEW, FRONT, SPANS + " --rewards=classifier:ship,brightness"),
    "compare_cpu_epsskip.json": ("042ab1e", DEFAULT, CMP),
    "compare_cpu.json": ("734d99f", OLD, CMP + " --methods=shortft,shortft_naive,draft,draft_lv,alignprop,drtune,full_ckpt"),
    "compare_cpu_default.json": ("efecc63", OLD + "; the same trained stages as `compare_cpu.json`, in a second folder", CMP),
    "gradients_h100_classroom.json": ("734d99f", H100, GRAD),
    "gradients_cpu_epsskip.json": ("1481d01", EPS_SG, "python benchmarks/bench_gradients.py --models=DIR --docs=docs "
                                   "(at commit 1481d01: the study's same-batch form)"),
    "ptrain_cpu.json": ("734d99f", OLD + "; the same trained stages as `compare_cpu.json`", CMP + "2 --methods=shortft,"
                        "shortft_no_ptrain --lrs=8e-4 --seeds=0,1,2,3,4 --eval_every_s=8 --n_eval=64"),
    "shortcut_spans_epsskip_cpu.txt": ("734d99f", EPS_SG, SPANS),
    "shortcut_spans_epsskip_ema95_cpu.txt": ("4cabb69", EPS + SLOW + "; its training shared the cores", SPANS),
    "shortcut_spans_epsskip_pipeline_cpu.txt": ("7dec3be", DEFAULT, SPANS),
    "shortcut_spans_default_cpu.txt": ("734d99f", OLD, SPANS),
    "shortcut_spans_default_ema95_cpu.txt": ("d798332", OLD.split(":")[0] + SLOW, SPANS),
    "cd_dynamics_cpu_lr1e-3.json": ("4cabb69", "one per row: " + EPS + "; " + OLD, CD),
    **{f"cd_dynamics_cpu_epsskip_{k}.json": ("4cabb69", EPS, CD) for k in ("lowlr", "ema95")},
    "gpu_h200.json": ("72437d4", "the GPU preset's 35.7M UNet and judges with random weights (stages, methods); SD 1.5's "
                      "shapes with random weights (sd); the training of the classroom checkpoints (classroom)", GPU),
    "gpu_h200_fid.json": ("72437d4", "real CIFAR-10 (training against test images) and " + CLASSROOM,
                          "python benchmarks/gpu.py --sections=fid --inception=PATH/default_1.pt --data_root=PATH/cifar10 "
                          "--out=/tmp/gpuout"),
    "pipeline_cpu_default.md": ("7dec3be", "trained in the run: the CPU preset's defaults, from scratch", None),
    "pipeline_cpu_old.md": ("b627af3", "trained in the run: the old CPU defaults (the 900-step base), from scratch", None),
    "pipeline_cpu_default_shortft_metrics.json": ("7dec3be", DEFAULT, None),
    "pipeline_cpu_old_shortft_metrics.json": ("b627af3", "the old 900-step base trained in `pipeline_cpu_old.md`'s run", None),
    **{f"pipeline_cpu_quick{x}": ("ba8604e", CLASSROOM + " via `--preset=quick`", None) for x in (".md", "_shortft_metrics.json")},
    "recipe_cpu_600s.json": ("1481d01", RECIPE, "python benchmarks/bench_recipe.py --variants=new,old900 --fid=new,old900 "
                             "--n_samples=1000 --budget_s=600"),
    "recipe_cpu_600s_old1700.json": ("7dec3be", RECIPE, None), "recipe_cpu_600s_seeds.json": ("b627af3", RECIPE, None),
    "recipe_cpu_arch.json": ("f235236", RECIPE, None),
    "recipe_cpu_300s.json": ("1481d01", RECIPE, "python benchmarks/bench_recipe.py --budget_s=300 --n_samples=500 "
                             "--variants=old,minsnr5,cosine,lr2e-3,b32,skip"),
    "recipe_cpu_300s_seeds.json": ("7dec3be", RECIPE, None)}
COMPANION = re.compile(r"(_table)?\.(md|log)$")  # X.md, X_table.md, X.log: the benchmark's own view of X.json, its log
RECIPES = ["recipe_cpu_600s.json", "recipe_cpu_600s_old1700.json", "recipe_cpu_600s_seeds.json", "recipe_cpu_arch.json",
           "recipe_cpu_300s.json", "recipe_cpu_300s_seeds.json"]
