"""Which text corpora does this machine hold? Bytes per extension under the Python prefix."""
import json, os, sys, sysconfig, collections
roots = {"stdlib": sysconfig.get_paths()["stdlib"], "purelib": sysconfig.get_paths()["purelib"]}
out = {}
for name, root in roots.items():
    by_ext = collections.Counter(); files = collections.Counter(); top = collections.Counter()
    for d, subs, names in os.walk(root):
        subs[:] = [s for s in subs if s != "__pycache__" and (name != "stdlib" or s not in ("site-packages", "dist-packages"))]
        for n in names:
            ext = os.path.splitext(n)[1]
            if ext in (".py", ".pyi", ".md", ".rst", ".txt", ".h", ".hpp", ".cpp", ".cu", ".cuh", ".c", ".json"):
                try: size = os.path.getsize(os.path.join(d, n))
                except OSError: continue
                by_ext[ext] += size; files[ext] += 1
                if ext == ".py": top[os.path.relpath(d, root).split(os.sep)[0]] += size
    out[name] = {"root": root, "bytes": dict(by_ext), "files": dict(files), "py_by_top": dict(top.most_common(25))}
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "corpus.json"), "w"), indent=1)
