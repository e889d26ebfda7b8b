"""The blocks marked SHARED are the same text in every method file (and in evaluate.py where marked),
so that `diff mae.py cmae.py` shows only what the methods do differently (STYLE P7)."""
import os
import re

import pytest

from conftest import ROOT

METHOD_FILES = [f for f in ["mae.py", "msn.py", "cmae.py", "conmim.py", "simsiam.py", "moco.py", "grafting.py"]
                if os.path.exists(os.path.join(ROOT, f))]


def shared_blocks(path):
    text = open(os.path.join(ROOT, path)).read()
    blocks = {m.group(1): m.group(0) for m in re.finditer(
        r"# ==== SHARED: (.*?),.*? ====\n.*?# ==== end SHARED ====\n", text, re.S)}
    fields = re.search(r"# ==== SHARED fields.*? ====\n(.*?)# ==== [\w ]+ specific ====", text, re.S)
    if fields:
        blocks["Args fields"] = fields.group(1)
    return blocks


def test_template_has_its_shared_blocks():
    names = set(shared_blocks("mae.py"))
    assert {"argument parsing", "recipe and encoder", "datasets", "Args fields"} <= names
    assert len(names) >= 7


@pytest.mark.parametrize("other", [f for f in METHOD_FILES if f != "mae.py"] + ["evaluate.py"])
def test_shared_blocks_are_identical(other):
    template, blocks = shared_blocks("mae.py"), shared_blocks(other)
    names = [n for n in template if other != "evaluate.py" or "evaluate.py" in template[n].splitlines()[0]]
    assert names, "nothing to compare"
    for name in names:
        assert name in blocks, f"{other} lacks the SHARED block {name!r}"
        assert blocks[name] == template[name], f"{other}: SHARED block {name!r} differs from mae.py"
