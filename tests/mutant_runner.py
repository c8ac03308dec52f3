"""Runs one exercise's check on several folders in one process (tests/test_exercises.py: the mutants), so
torch is imported once, not once per mutant:  python tests/mutant_runner.py NAME REPORT_DIR FOLDER...
Prints one line per folder: its pytest return code, then the folder."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    name, report_dir, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.chdir(ROOT)
    for i, folder in enumerate(folders):
        for mod in [m for m in sys.modules if m.startswith("check_")]:
            del sys.modules[mod]  # the check loads the module under test at import: import it again
        os.environ["SHORTFT_EXERCISE_DIR"] = folder
        rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", f"--junitxml={os.path.join(report_dir, f'{i}.xml')}",
                          os.path.join("exercises", f"check_{name}.py")])
        print(f"@@ {int(rc)} {folder}", flush=True)
