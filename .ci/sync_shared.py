"""Copy the shared blocks of mae.py (the machinery at the end, the SHARED Args fields) into the other method
files, and its sections marked "(also in evaluate.py)" into evaluate.py, after editing them in mae.py:
`python .ci/sync_shared.py`. tests/test_shared_blocks.py checks the copies."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["msn.py", "cmae.py", "conmim.py", "simsiam.py", "moco.py", "grafting.py"]
MACHINERY = "# ==== SHARED: machinery"
FIELDS = re.compile(r"(    # ==== SHARED fields.*? ====\n)(.*?)(    # ==== [\w ]+ specific ====)", re.S)


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


source = read("mae.py")
machinery, fields = source[source.index(MACHINERY):], FIELDS.search(source).group(2)
for name in FILES:
    text = read(name)
    text = text[:text.index(MACHINERY)] + machinery
    text = FIELDS.sub(lambda m: m.group(1) + fields + m.group(3), text, count=1)
    with open(os.path.join(ROOT, name), "w") as f:
        f.write(text)
    print(f"{name}: shared blocks copied from mae.py")

SECTION = re.compile(r"^# ---- (.+?) ----\n", re.M)
parts = SECTION.split(machinery.replace("# ==== end SHARED ====", ""))
text = read("evaluate.py")
for name, body in zip(parts[1::2], parts[2::2]):
    if name.endswith("(also in evaluate.py)"):
        start = text.index(f"# ---- {name} ----\n")
        end = re.compile(r"^# ---- .+ ----\n|^# -{10,}", re.M).search(text, start + 1).start()  # the next marker
        text = text[:start] + f"# ---- {name} ----\n" + body.rstrip() + "\n\n" + text[end:]
with open(os.path.join(ROOT, "evaluate.py"), "w") as f:
    f.write(text)
print("evaluate.py: its shared sections copied from mae.py")
