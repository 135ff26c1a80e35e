"""Checks bench/gpu_libs.py's choices on a made-up machine: CUDA 12 and 13 libraries side by side, a driver
that supports CUDA 13.0 (a fake nvidia-smi), NVRTC 13.1 too new for it. Run by CI (no GPU needed)."""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "bench", "gpu_libs.py")


def main():
    with tempfile.TemporaryDirectory() as t:
        files = {
            "usr/local/cuda-13.0/lib64/libnvrtc.so.13.0.48": None,
            "usr/local/cuda-13.0/lib64/libnvrtc.so.13": "libnvrtc.so.13.0.48",  # a link: not a candidate
            "usr/local/cuda-13.0/lib64/libnvrtc-builtins.so.13.0": None,
            "usr/local/cuda-13.1/lib64/libnvrtc.so.13.1.20": None,  # newer than the driver
            "usr/local/cuda-13.0/lib64/libcublas.so.13.0.0.19": None,
            "usr/local/cuda-13.0/lib64/libcublasLt.so.13.0.0.19": None,
            "opt/venv/site-packages/nvidia/cu12/lib/libnvrtc.so.12": None,
            "opt/venv/site-packages/nvidia/cu12/lib/libcublas.so.12": None,
            "opt/venv/site-packages/nvidia/cu12/lib/libnvrtc.alt.so.12": None,  # not a name cudarc loads
        }
        for rel, target in files.items():
            p = os.path.join(t, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if target:
                os.symlink(target, p)
            else:
                open(p, "w").close()
        bindir = os.path.join(t, "bin")
        os.makedirs(bindir)
        smi = os.path.join(bindir, "nvidia-smi")
        with open(smi, "w") as f:
            f.write("#!/bin/sh\necho '| NVIDIA-SMI 580.159.03   Driver Version: 580.159.03   CUDA Version: 13.0 |'\n")
        os.chmod(smi, 0o755)
        out = os.path.join(t, "lib")
        env = dict(os.environ, PATH=bindir + ":" + os.environ["PATH"],
                   GPU_LIBS_ROOTS=os.path.join(t, "usr") + ":" + os.path.join(t, "opt"), LD_LIBRARY_PATH="/x")
        r = subprocess.run([sys.executable, SCRIPT, out], env=env, capture_output=True, text=True, check=True)
        got = {n: os.path.relpath(os.readlink(os.path.join(out, n)), t) for n in sorted(os.listdir(out))}
        want = {
            "libcublas.so": "usr/local/cuda-13.0/lib64/libcublas.so.13.0.0.19",
            "libcublasLt.so": "usr/local/cuda-13.0/lib64/libcublasLt.so.13.0.0.19",
            "libnvrtc.so": "usr/local/cuda-13.0/lib64/libnvrtc.so.13.0.48",
        }
        assert got == want, f"links: {got}\n{r.stderr}"
        lib = os.path.join(t, "usr/local/cuda-13.0/lib64")
        assert r.stdout.strip() == f"export LD_LIBRARY_PATH='{out}:{lib}:/x'", r.stdout
        assert "CUDA (13, 0)" in r.stderr and "(not used)" in r.stderr, r.stderr
    print("gpu_libs: CUDA 13.0 driver -> NVRTC 13.0 (not 13.1, not 12), cuBLAS 13; LD_LIBRARY_PATH as expected")


if __name__ == "__main__":
    main()
