"""Latency benchmark of the Gradio Space: what a user meets, and the computation behind it.

    python eval/bench_app.py                               # embedded default pipeline
    python eval/bench_app.py --model path/or/org-repo --runs 20 --client --startup 3 --stress 60
    python eval/bench_app.py --random-from-config configs/mnist.yaml   # same architecture, random weights

Compute = the pipeline's batched views (``InvariancePipeline.interpret``, ``layer_sweep``, ``mix_layers``,
``attack``) called in this process on an example image, i.e. the networks of one request without
input decoding, rendering and transport. ``--client`` starts ``python app.py`` as a subprocess on a
free loopback port and times requests through ``gradio_client`` (upload, queue, handler, and the result
files downloaded, as a user's client does; ``--no-downloads`` leaves them on the server). What a browser
user waits for is measured by ``eval/bench_browser.py``. ``--startup N`` times N cold starts of ``app.py``;
``--stress S`` runs concurrent clients (with downloads) against the subprocess for S seconds. Latency depends on the architecture, not on
the weights, so ``--random-from-config`` measures a pipeline before its training is done.
CPU time (process time of all threads of this process) is printed next to the wall time: on a shared
machine the wall time includes waiting for the CPU, the CPU time does not (for client requests it
counts only the client's side).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
HOST = "127.0.0.1"  # loopback only


def random_pipeline(config: str | Path, out: str | Path) -> Path:
    """A pipeline with the config's architecture and random weights (ActNorms initialised on random data)."""
    import torch
    import yaml

    from invint_hub import Autoencoder, Backbone, ConditionalINN, InvariancePipeline

    cfg = yaml.safe_load(Path(config).read_text())
    d = cfg["data"]
    torch.manual_seed(0)
    bb = Backbone(in_channels=d["channels"], image_size=d["image_size"], **cfg["classifier"].get("model", {})).eval()
    ae = Autoencoder(image_size=d["image_size"], channels=d["channels"], **cfg["autoencoder"].get("model", {})).eval()
    ae.latent_var.fill_(float(ae.latent_dim))
    x = torch.rand(64, d["channels"], d["image_size"], d["image_size"]) * 2 - 1
    cinns = {}
    for layer in cfg["cinn"]["layers"]:
        t = ConditionalINN(latent_dim=ae.latent_dim, cond_shape=list(bb.feature_shapes[layer]), layer=layer,
                           **cfg["cinn"].get("model", {})).train()
        with torch.no_grad():
            t(ae.encode(x).mode(), bb.representation(x, layer))
        cinns[layer] = t.eval()
    pipe = InvariancePipeline(bb, ae, cinns, {"dataset": d["name"], "format": "invint_hub.pipeline/1"})
    return pipe.save_pretrained(out)


def timed(fn, runs: int, warmup: int = 2, name: str = "", verbose: bool = False) -> dict:
    if name:
        print(f"  timing {name} ...", flush=True)
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if verbose:
            print(f"    {1000 * wall[-1]:.0f} ms (CPU {1000 * cpu[-1]:.0f} ms)", flush=True)
    return {"median_ms": 1000 * statistics.median(wall), "min_ms": 1000 * min(wall), "max_ms": 1000 * max(wall),
            "cpu_median_ms": 1000 * statistics.median(cpu), "runs": runs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        r.read()
    return time.perf_counter() - t


@contextmanager
def app_server(app_args: list[str], timeout: float = 180, script: str | Path | None = None):
    """``python app.py`` (or ``script``) on a free loopback port: yields (url, seconds until its page answered);
    stopped on exit."""
    script = Path(script or ROOT / "app.py").resolve()
    port = free_port()
    url = f"http://{HOST}:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(script), "--host", HOST, "--port", str(port), *app_args],
                                cwd=script.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = " ".join(log.read()[-400:].split())
                    raise RuntimeError(f"app.py exited early with code {proc.returncode}: {tail}")
                try:
                    get(url, timeout=2)
                    break
                except OSError:
                    if time.perf_counter() - t0 > timeout:
                        raise RuntimeError(f"app.py not ready after {timeout} s") from None
                    time.sleep(0.1)
            yield url, time.perf_counter() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def client(url: str, downloads: bool = True):
    """A gradio_client session; with ``downloads`` it fetches every result file, as a user's client does."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=tempfile.mkdtemp(prefix="bench_dl_") if downloads else False)


def stress(url: str, model: str, example: str, seconds: float, clients: int, layer: str, downloads: bool = True) -> dict:
    """``clients`` gradio_client sessions alternating Interpret and layer-sweep requests for ``seconds``."""
    from gradio_client import handle_file

    errors: list[str] = []
    lat: list[float] = []
    page: list[float] = []
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(i: int) -> None:
        c = client(url, downloads)
        k = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                if (i + k) % 2:
                    c.predict(model, handle_file(example), None, True, layer, 16, 1.0, k, api_name="/interpret")
                else:
                    c.predict(model, handle_file(example), None, True, 16, 1.0, k, api_name="/layer_sweep")
                with lock:
                    lat.append(time.perf_counter() - t)
            except Exception as e:  # every failure counts
                with lock:
                    errors.append(repr(e)[:200])
            k += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        try:
            page.append(get(url))
        except OSError as e:
            errors.append(f"page: {e!r}")
        time.sleep(1.0)
    for t in threads:
        t.join()
    lat.sort()
    return {"seconds": seconds, "clients": clients, "downloads": downloads, "requests": len(lat),
            "requests_per_s": len(lat) / seconds, "errors": len(errors),
            "error_examples": errors[:3], "latency_median_ms": 1000 * statistics.median(lat) if lat else None,
            "latency_p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else None,
            "page_load_max_ms": 1000 * max(page) if page else None}


def compute(res: dict, pipe, xa, xb, layer: str, n: int, runs: int, verbose: bool) -> None:
    """In-process timings of the pipeline's batched views (the networks of one request)."""
    res["compute_interpret"] = timed(lambda: pipe.interpret(xa, layer, n, 1.0, 0), runs, name="interpret", verbose=verbose)
    res["compute_layer_sweep"] = timed(lambda: pipe.layer_sweep(xa, min(n, 16), 1.0, 0), runs, name="layer_sweep",
                                       verbose=verbose)
    res["compute_mix"] = timed(lambda: pipe.mix_layers(xa, xb), runs, name="mix_layers", verbose=verbose)
    res["compute_adversarial"] = timed(lambda: pipe.attack(xa, 0.1, 0), runs, name="attack", verbose=verbose)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline (embedded name, folder or Hub id); default: embedded mnist")
    ap.add_argument("--random-from-config", default=None, metavar="YAML",
                    help="benchmark a random-weight pipeline with this config's architecture")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--layer", default=None, help="layer of the Interpret request (default: the middle one)")
    ap.add_argument("--client", action="store_true", help="also time requests to `python app.py` through gradio_client")
    ap.add_argument("--startup", type=int, default=0, metavar="N", help="time N cold starts of app.py")
    ap.add_argument("--stress", type=float, default=0, metavar="SECONDS", help="concurrent clients for SECONDS")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-downloads", action="store_true",
                    help="clients do not fetch the result files (gradio_client download_files=False; a browser does fetch)")
    ap.add_argument("--no-compute", action="store_true", help="skip the in-process compute timings")
    ap.add_argument("--app", default=None, help="the app script to serve (default: this checkout's app.py)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in app.py (default 1, as app.py)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--verbose", action="store_true", help="print every run")
    args = ap.parse_args(argv)

    import torch

    from invint_hub import InvariancePipeline, space
    from invint_hub.pipeline import embedded_pipelines

    torch.set_num_threads(args.threads)
    if args.random_from_config:
        model = str(random_pipeline(args.random_from_config, tempfile.mkdtemp(prefix="bench_pipe_")))
    else:
        model = args.model or "mnist"
        if model not in embedded_pipelines() and not Path(model).exists() and model.count("/") != 1:
            sys.exit(f"model {model!r} not found (embedded: {embedded_pipelines()}); try --random-from-config configs/mnist.yaml")
    pipe = InvariancePipeline.from_pretrained(model)
    layer = args.layer or pipe.layers[len(pipe.layers) // 2]  # the Space's default layer
    examples, _ = space.build_examples(pipe, tempfile.mkdtemp(prefix="bench_examples_"), 2)  # as the Space makes them
    example, ex2 = str(examples[0]), str(examples[-1])
    domain = space.input_domain(pipe)
    xa, xb = (space.prepare_input(pipe, space.load_image(p), convert=True, domain=domain)[0] for p in (example, ex2))
    res: dict = {"model": model, "layers": pipe.layers, "samples": args.samples, "layer": layer,
                 "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    print(f"model {model}: {pipe}\nexample {example}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")

    n, runs, verbose = args.samples, args.runs, args.verbose
    downloads = not args.no_downloads
    res["client_downloads"] = downloads
    if not args.no_compute:
        compute(res, pipe, xa, xb, layer, n, runs, verbose)

    embedded = model in embedded_pipelines()
    app_args = (["--model", model] if embedded else ["--no-embedded", "--model", model]) + ["--threads", str(args.threads)]
    if args.client or args.stress:
        from gradio_client import handle_file

        with app_server(app_args + ["--examples", "2"], script=args.app) as (url, _):
            if args.client:
                c = client(url, downloads)
                convert = domain == "digit"
                requests = {
                    "interpret": lambda: c.predict(model, handle_file(example), None, convert, layer, n, 1.0, 0,
                                                   api_name="/interpret"),
                    "layer_sweep": lambda: c.predict(model, handle_file(example), None, convert, n, 1.0, 0,
                                                     api_name="/layer_sweep"),
                    "mix": lambda: c.predict(model, handle_file(example), handle_file(ex2), convert, api_name="/mix"),
                    "adversarial": lambda: c.predict(model, handle_file(example), convert, 0.1, 0, api_name="/adversarial"),
                }
                for k, fn in requests.items():
                    res[f"client_{k}"] = timed(fn, runs, name=f"client {k}", verbose=verbose)
            if args.stress:
                res["stress"] = stress(url, model, example, args.stress, args.clients, layer, downloads)
    if args.startup:
        times = []
        for i in range(args.startup):
            print(f"  cold start {i + 1}/{args.startup} ...", flush=True)
            with app_server(app_args, script=args.app) as (_, seconds):
                times.append(seconds)
        res["startup"] = {"median_s": statistics.median(times), "all_s": times}
    res["load_after"] = os.getloadavg()[0]

    print(f"\n{'request':<24}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'CPU ms':>9}  (runs)")
    for k, v in res.items():
        if isinstance(v, dict) and "median_ms" in v:
            print(f"{k:<24}{v['median_ms']:>11.1f}{v['min_ms']:>9.1f}{v['max_ms']:>9.1f}{v['cpu_median_ms']:>9.1f}  ({v['runs']})")
    if "startup" in res:
        print(f"{'startup to ready':<24}{1000 * res['startup']['median_s']:>11.0f}   all: "
              f"{', '.join(f'{t:.1f}s' for t in res['startup']['all_s'])}")
    if "stress" in res:
        print(f"stress: {json.dumps(res['stress'])}")
    print(f"load average before/after: {res['load_before']:.2f} / {res['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
