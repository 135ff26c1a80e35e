"""Makes the CUDA libraries loadable for mpopt's CUDA executor on a machine set up for another CUDA version.

    eval "$(python3 bench/gpu_libs.py DIR)"

mpopt-cuda loads libcuda, libnvrtc and libcublas at run time through cudarc, which tries a fixed list of
names (libnvrtc.so, libnvrtc.so.12, ..., no .so.13). A machine with CUDA 13 has libnvrtc.so.13 and may not
have the unversioned link on the loader's path. This script finds each library under the usual places (the
toolkit, the driver's folders, pip's nvidia-* wheels under /opt and /usr), picks for NVRTC the newest
version not newer than the driver (PTX from a newer NVRTC does not load: mpopt refuses that pairing with an
error), and for cuBLAS the newest of the driver's major version. It links them under their unversioned names
in DIR and prints the `export LD_LIBRARY_PATH=...` line that puts DIR and their own folders (for
libnvrtc-builtins and libcublasLt) first. What it found goes to stderr.
"""

import os
import re
import subprocess
import sys

# where to look ($GPU_LIBS_ROOTS, colon-separated, replaces the list)
ROOTS = os.environ.get("GPU_LIBS_ROOTS", "/usr/local:/usr/lib/x86_64-linux-gnu:/usr/lib64:/opt").split(":")
LIBS = ["libnvrtc", "libcublas", "libcublasLt"]


def driver_cuda():
    """(major, minor) of the CUDA version the driver supports, from nvidia-smi; None without one."""
    try:
        s = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", s)
    return (int(m[1]), int(m[2])) if m else None


def candidates():
    """{lib: [(version tuple, path)]} of the versioned files found (real files, not links)."""
    pat = re.compile(r"^(%s)\.so\.(\d+(?:\.\d+)*)$" % "|".join(map(re.escape, LIBS)))
    found = {lib: [] for lib in LIBS}
    for root in ROOTS:
        for d, dirs, files in os.walk(root, followlinks=False):
            # not into other machines' trees or caches
            dirs[:] = [x for x in dirs if x not in ("proc", "sys", "share", "include", "__pycache__")]
            for f in files:
                m = pat.match(f)
                p = os.path.join(d, f)
                if m and not os.path.islink(p):
                    found[m[1]].append((tuple(int(x) for x in m[2].split(".")), p))
    return found


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".gpu/run/lib")
    os.makedirs(out, exist_ok=True)
    drv = driver_cuda()
    print(f"gpu_libs: driver supports CUDA {drv}", file=sys.stderr)
    found = candidates()
    dirs = []
    for lib, hits in found.items():
        if drv:
            if lib == "libnvrtc":
                ok = [h for h in hits if h[0][:2] <= drv]
            else:
                ok = [h for h in hits if h[0][0] == drv[0]] or [h for h in hits if h[0][0] <= drv[0]]
        else:
            ok = hits
        for v, p in sorted(hits):
            print(f"gpu_libs: {lib} {'.'.join(map(str, v))} at {p}{'' if (v, p) in ok else ' (not used)'}",
                  file=sys.stderr)
        if not ok:
            print(f"gpu_libs: no usable {lib}", file=sys.stderr)
            continue
        v, p = max(ok)
        link = os.path.join(out, lib + ".so")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(p, link)
        print(f"gpu_libs: {link} -> {p}", file=sys.stderr)
        if os.path.dirname(p) not in dirs:
            dirs.append(os.path.dirname(p))
    path = ":".join([out] + dirs + [x for x in os.environ.get("LD_LIBRARY_PATH", "").split(":") if x])
    print(f"export LD_LIBRARY_PATH='{path}'")


if __name__ == "__main__":
    main()
