"""Where a Space request's CPU goes: encoding of the result images, and server vs client CPU per call.

    python -m eval.bench_space_costs encode                 # in process: PNG levels, WebP, JPEG, Gradio's save
    python -m eval.bench_space_costs cpu --app app.py --runs 20   # `python app.py` as a subprocess

``encode`` times the encoders on the Space's own result images (Interpret with 16 samples, the layer sweep
with 5 x 16) on the embedded MNIST pipeline. ``cpu`` starts the app on a free loopback port and, for
sequential gradio_client calls with and without downloads, reports wall time per call and the CPU time the
server process (from /proc, Linux) and this client process spent per call: on a shared machine the CPU
times say more than the wall time about what a change saves.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _median_ms(fn, k: int = 21) -> float:
    fn()
    ts = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def encode() -> None:
    import functools

    import torch
    from gradio import processing_utils

    from invint_hub import InvariancePipeline, space

    torch.set_num_threads(1)
    pipe = InvariancePipeline.from_pretrained("mnist")
    ex = space.build_examples(pipe, tempfile.mkdtemp(prefix="bench_costs_"), 1)[0][0]
    x = space.prepare_input(pipe, space.load_image(str(ex)), convert=True, domain=space.input_domain(pipe))[0]
    name = functools.partial(space.class_name, pipe)
    r = pipe.interpret(x, pipe.layers[len(pipe.layers) // 2], 16, 1.0, 0)
    c_in = int(r.probs.argmax())
    grids = {  # the images the Space returns (app.SpaceApp.interpret and .sweep draw them with these calls)
        "interpret (16 samples)": space.interpret_grid(r.x[0], r.recon[0], r.samples, [name(int(c)) for c in r.sample_pred],
                                                       [int(c) != c_in for c in r.sample_pred]),
        "layer sweep (5 x 16)": space.sweep_grid(pipe.layer_sweep(x, 16, 1.0, 0), name),
    }

    def enc(im, fmt, **kw):
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    print(f"load average {os.getloadavg()[0]:.2f}")
    d = tempfile.mkdtemp()
    for name, g in grids.items():
        print(f"{name}: {g.size[0]}x{g.size[1]} px")
        for label, fmt, kw in [("PNG level 6 (PIL's and Gradio's default)", "PNG", {}),
                               ("PNG level 1", "PNG", {"compress_level": 1}), ("PNG level 9", "PNG", {"compress_level": 9}),
                               ("WebP lossless", "WEBP", {"lossless": True}),
                               ("WebP quality 80 (lossy)", "WEBP", {}), ("JPEG quality 75 (lossy)", "JPEG", {})]:
            print(f"  {label:<44}{_median_ms(lambda: enc(g, fmt, **kw)):7.1f} ms {len(enc(g, fmt, **kw)) / 1024:7.1f} KB")
        print(f"  {'Gradio save_pil_to_cache (png)':<44}"
              f"{_median_ms(lambda: processing_utils.save_pil_to_cache(g, d, format='png')):7.1f} ms")
        print(f"  {'space.png_file (level 1, once per content)':<44}{_median_ms(lambda: space.png_file(g, d)):7.1f} ms")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu(app_script: str | None, runs: int) -> None:
    from gradio_client import Client, handle_file

    from eval.bench_app import app_server
    from invint_hub import InvariancePipeline, space

    pipe = InvariancePipeline.from_pretrained("mnist")
    ex = str(space.build_examples(pipe, tempfile.mkdtemp(prefix="bench_costs_"), 1)[0][0])
    print(f"load average {os.getloadavg()[0]:.2f}")
    with app_server(["--model", "mnist", "--examples", "2"], script=app_script) as (url, _):
        port = url.rstrip("/").rsplit(":", 1)[1]
        out = subprocess.check_output(["ss", "-ltnpH", f"sport = :{port}"], text=True)
        pid = int(out.split("pid=")[1].split(",")[0])
        for downloads in (True, False):
            c = Client(url, verbose=False, download_files=tempfile.mkdtemp() if downloads else False)
            for api, args in (("/interpret", ["mnist", None, None, True, "fc", 16, 1.0]),
                              ("/layer_sweep", ["mnist", None, None, True, 16, 1.0])):
                def call(k: int) -> None:
                    c.predict(*args[:1], handle_file(ex), *args[2:], k, api_name=api)

                call(0), call(1)
                s0, c0, t0 = _proc_cpu(pid), time.process_time(), time.perf_counter()
                for k in range(runs):
                    call(k + 2)
                print(f"{api:<13} downloads={downloads!s:<5}: wall {1000 * (time.perf_counter() - t0) / runs:5.0f} ms, "
                      f"server CPU {1000 * (_proc_cpu(pid) - s0) / runs:4.0f} ms, "
                      f"client CPU {1000 * (time.process_time() - c0) / runs:4.0f} ms per call", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("encode", help="encoders on the Space's result images")
    c = sub.add_parser("cpu", help="server and client CPU per call")
    c.add_argument("--app", default=None, help="app script (default: this checkout's app.py)")
    c.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    encode() if args.what == "encode" else cpu(args.app, args.runs)


if __name__ == "__main__":
    main()
