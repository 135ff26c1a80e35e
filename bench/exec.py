"""fp32 inference time of every corpus model: mpopt's CPU executor (`mpopt run --repeat`) against onnxruntime's
CPU provider (InferenceSession.run), the same inputs and the same thread count, side by side in one run.
Both report the median of repeated runs after a warm-up, model loading excluded. Prints a Markdown table."""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time

import numpy as np
import onnxruntime as ort


def ort_time(path, feeds, threads, repeat):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mpopt_time(mpopt, path, npz, threads, repeat):
    r = subprocess.run([mpopt, "run", path, "--inputs", npz, "--threads", str(threads), "--repeat", str(repeat)],
                       capture_output=True, text=True, check=True)
    m = re.search(r"in ([0-9.]+) ms \(median", r.stderr)
    return float(m.group(1)) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("corpus")
    a = ap.parse_args()
    print(f"threads: {a.threads}; median of {a.repeat} runs after a warm-up; inputs: the corpus inputs.npz\n")
    print("| model | onnxruntime ms | mpopt ms | ratio (mpopt / ort) | target |")
    print("|---|---|---|---|---|")
    heavy = {"open_nsfw_resnet50", "paraphrase_minilm_l3_v2"}
    for name in sorted(os.listdir(a.corpus)):
        path = os.path.join(a.corpus, name, "model.onnx")
        npz = os.path.join(a.corpus, name, "inputs.npz")
        if not os.path.exists(path):
            continue
        z = np.load(npz)
        feeds = {k: z[k] for k in z.files if "__set" not in k}
        t_ort = ort_time(path, feeds, a.threads, a.repeat)
        t_mp = mpopt_time(a.mpopt, path, npz, a.threads, a.repeat)
        target = 1.5 if name in heavy else 3.0
        ratio = t_mp / t_ort
        ok = "ok" if ratio <= target else "MISSED"
        print(f"| {name} | {t_ort * 1e3:.1f} | {t_mp * 1e3:.1f} | {ratio:.2f} | <= {target} {ok} |")


if __name__ == "__main__":
    main()
