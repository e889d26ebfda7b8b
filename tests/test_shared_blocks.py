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


def test_blocks_that_mae_lacks_are_identical_wherever_they_are():
    """The colour block (device-side augmentation) is in every method file with colour views."""
    found = {}
    for f in METHOD_FILES:
        for name, text in shared_blocks(f).items():
            if name not in shared_blocks("mae.py"):
                found.setdefault(name, []).append((f, text))
    assert "colour augmentation on the device" in found
    assert len(found["colour augmentation on the device"]) == 6  # all but mae.py
    for name, copies in found.items():
        for f, text in copies:
            assert text == copies[0][1], f"{f}: SHARED block {name!r} differs from {copies[0][0]}"


@pytest.mark.parametrize("other", [f for f in METHOD_FILES if f != "mae.py"] + ["evaluate.py"])
def test_shared_blocks_are_identical(other):
    template, blocks = shared_blocks("mae.py"), shared_blocks(other)
    names = [n for n in template if other != "evaluate.py" or "evaluate.py" in template[n].splitlines()[0]]
    assert names, "nothing to compare"
    for name in names:
        assert name in blocks, f"{other} lacks the SHARED block {name!r}"
        assert blocks[name] == template[name], f"{other}: SHARED block {name!r} differs from mae.py"


# functions a file copies from another method file, with the same name and the same text
COPIES = {
    "grafting.py": {"mae": ["random_masking", "MAEDecoder", "mae_loss"],
                    "moco": ["mlp", "momentum_at", "contrastive_loss", "moco_loss"]},
    "cmae.py": {"mae": ["MAEDecoder", "mae_loss"]},
}


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_copied_functions_are_identical(copy):
    import importlib
    import inspect
    module = importlib.import_module(copy.removesuffix(".py"))
    for source, names in COPIES[copy].items():
        original = importlib.import_module(source)
        for name in names:
            assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(original, name)), \
                f"{copy}: {name} differs from {source}.py"


def test_grafting_uses_moco_v3_views():
    import grafting
    import moco
    import dataclasses
    assert [dataclasses.astuple(c) for c in grafting.MOCO_COLOURS] == [dataclasses.astuple(c) for c in moco.MOCO_COLOURS]
    args = grafting.Args(img_size=32, mode="graft")
    assert [str(c) for c in grafting.train_transform(args).crops] == [str(c) for c in moco.train_transform(args).crops]
