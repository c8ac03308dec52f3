"""The front door: the README is short, opens with the two commands and the "what this toy shows" box,
every number of its results blocks is in the generated docs/results.md, and the defaults it and
docs/usage.md state agree with sftlib/config.py, so they cannot drift again."""
import os
import re

from sftlib import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRONT = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
USAGE = open(os.path.join(ROOT, "docs", "usage.md"), encoding="utf-8").read()
RESULTS = open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8").read()
README = FRONT + "\n" + USAGE  # the defaults and the presets table may be stated in either


def same(key, text, defaults=config.DEFAULTS):
    """Whether the README's text for a key equals its value in `defaults`, typed as the config types it."""
    try:
        return config._convert(key, text, config.DEFAULTS[key]) == defaults[key]
    except Exception:
        return False


def stated_defaults(text):
    """(key, value, context) of every default the text states in one of the two forms the README uses:
    "`key=value` (default...)" and "default(s) (`key=value`, `key=value`...)"."""
    flat = " ".join(text.split())
    found = [(k, v, flat[max(0, m.start() - 60):m.end()]) for m in
             re.finditer(r"`(?:--)?([a-z_0-9]+)=([^`\s]+)`\s*\((?:the )?default", flat) for k, v in [m.groups()]]
    for m in re.finditer(r"\bdefaults?\s*(?:are|is|:)?\s*\(?((?:`[^`]+`[,;]?\s*(?:and\s*)?)+)", flat):
        found += [(k, v, flat[max(0, m.start() - 60):m.end()]) for k, v in re.findall(r"`(?:--)?([a-z_0-9]+)=([^`\s]+)`", m.group(1))]
    return [(k, v, c) for k, v, c in found if k in config.DEFAULTS and not re.search(r"\bearlier\b", c, re.I)]


def test_every_default_the_readme_states_is_the_configs():
    """Each default the README states for a key of config.DEFAULTS (not an earlier version's) is the config's."""
    stated = stated_defaults(README)
    wrong = [f"{k}={v} (config: {config.DEFAULTS[k]!r}): ...{c}" for k, v, c in stated if not same(k, v)]
    assert not wrong, "README states defaults that config.py does not have:\n" + "\n".join(wrong)
    assert len(stated) >= 2, f"the README's stated defaults were not found ({stated}): has their wording changed?"


def test_the_preset_table_matches_the_config():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(cpu|gpu|gpu_long)`[^|]*\|([^\n]*)$", README, re.M)}
    assert set(rows) == {"cpu", "gpu", "gpu_long"}
    for name, row in rows.items():
        cfg = dict(config.DEFAULTS, **config.PRESETS[name])
        m = re.search(r"ch (\d+), mult ([\d,]+), (\d+) res blocks?, (?:attention at (\d+)×\d+|no attention)", row)
        assert m, row
        assert (int(m.group(1)), m.group(2), int(m.group(3))) == (cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]), row
        assert (m.group(4) or "") == cfg["attn_res"], row
        m = re.search(r"([\d,.k]+) (steps|s \(`ddpm_seconds`\)) × batch (\d+), `ddpm_lr` ([\d.e-]+)", row)
        assert m, row
        n = float(m.group(1).replace(",", "").replace("k", "")) * (1000 if "k" in m.group(1) else 1)
        budget = cfg["ddpm_steps"] if m.group(2) == "steps" else cfg["ddpm_seconds"]
        assert (n, int(m.group(3)), float(m.group(4))) == (budget, cfg["ddpm_batch"], cfg["ddpm_lr"]), row
        params = re.search(r"([\d.]+)M param", row)
        assert params, row
        from unet import build_unet
        n = sum(p.numel() for p in build_unet(cfg).parameters()) / 1e6
        assert abs(n - float(params.group(1))) <= 0.05 * 10 ** -(len(params.group(1).split(".")[1]) - 1), (row, n)


def test_the_checks_fail_on_a_drifted_readme(monkeypatch):
    """The first check is not vacuous: a README stating another default fails it."""
    import tests.test_readme as me  # noqa: the module under its package name

    key = "ft_lr"
    drifted = README + f"\nThe default `{key}={config.DEFAULTS[key] * 2}`.\n"
    monkeypatch.setattr(me, "README", drifted)
    try:
        me.test_every_default_the_readme_states_is_the_configs()
    except AssertionError as e:
        assert key in str(e)
    else:
        raise AssertionError("a drifted default passed")


def test_the_front_door_is_short_and_opens_with_the_commands_and_the_box():
    lines = FRONT.splitlines()
    assert len(lines) <= 250, len(lines)
    box = next(i for i, line in enumerate(lines) if line.startswith("## What this toy shows, and what it does not"))
    assert box < 60, box
    marker = lines.index("<!-- test-command -->")
    assert marker < box and "python -m pytest" in lines[marker + 1]
    assert any("pip install -r requirements.txt && python train_toy.py" in line for line in lines[:marker])
    assert "../shared" not in FRONT  # the commands must hold for a clone anywhere


def result_numbers(text):
    """The decimal numbers inside the README's <!-- numbers: from results --> blocks (signs and the
    unicode minus dropped: a number and its negation are the same figure to look up)."""
    blocks = re.findall(r"<!-- numbers: from results -->(.*?)<!-- /numbers -->", text, re.S)
    return blocks, {n for b in blocks for n in re.findall(r"\d+\.\d+", b.replace("−", "-"))}


def test_every_number_of_the_results_blocks_is_in_the_generated_results():
    """The README's figures come from results files: each decimal in its results blocks appears in
    docs/results.md (itself regenerated from benchmarks/results/ by tests/test_results_doc.py)."""
    blocks, numbers = result_numbers(FRONT)
    assert len(blocks) >= 2 and len(numbers) >= 20, (len(blocks), len(numbers))
    missing = sorted(n for n in numbers if not re.search(r"(?<![\d.])" + re.escape(n) + r"(?![\d])", RESULTS))
    assert not missing, f"README numbers not in docs/results.md: {missing}"


def test_the_number_check_catches_an_invented_figure():
    text = FRONT.replace("<!-- /numbers -->", "an invented 0.4321 <!-- /numbers -->", 1)
    _, numbers = result_numbers(text)
    assert "0.4321" in numbers and "0.4321" not in RESULTS
