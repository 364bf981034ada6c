"""The script behind eval/results/bench_cinn.md's fast-path decision tables (a) and (b), kept as a record.

It measures the OLD code: run it with a checkout of commit c0e4d33 (the last with the fast path) first on
sys.path, e.g. `git worktree add /tmp/flows_old c0e4d33`, then
`APPROOT=/tmp/flows_old PYTHONPATH=/tmp/flows_old python eval/results/fast_path_decision.py --part a`.
Nothing imports it; against the current code it fails (there is no `.fast()` any more).
"""
import argparse, copy, os, statistics, sys, time, types
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--part", choices=["a", "b", "b2"], required=True)
ap.add_argument("--runs", type=int, default=25)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--variants", default="fast,plain,once,compile")
args = ap.parse_args()
torch.set_num_threads(args.threads)
variants = args.variants.split(",")


def embed_once_sample(self, z, n=1, temperature=1.0, generator=None):
    """plain cINN sampling with the condition embedded once and its embedding repeated."""
    param = next(self.parameters())
    device = generator.device if generator is not None else param.device
    v = torch.randn(z.shape[0] * n, self.latent_dim, generator=generator, device=device).to(param.device, param.dtype)
    cond = self.embedder(z).repeat_interleave(n, dim=0)
    return self.flow.inverse(temperature * v, cond)[0]


def compile_cinn(t):
    """torch.compile (inductor) of the plain module's inverse (embedder + flow)."""
    t.inverse = torch.compile(t.inverse, dynamic=False)
    return t


def interleave(fns, runs, warmup=2):
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            wall[k].append(1e3 * (time.perf_counter() - t0))
    return wall


def report(wall, header):
    print(header, "| load", os.getloadavg())
    base = statistics.median(wall[list(wall)[0]])
    for k, w in wall.items():
        q = statistics.quantiles(w, n=4)
        m = statistics.median(w)
        print(f"  {k:<10} median {m:8.2f} ms  IQR {q[0]:7.2f}-{q[2]:7.2f}  min {min(w):7.2f}  "
              f"x{base / m:5.2f} vs {list(wall)[0]}  (n={len(w)})")
    sys.stdout.flush()


if args.part == "b2":  # the old fast path without oneDNN / without its cache; compile with inductor freezing
    threads = args.threads
    from invint_hub.cinn import ConditionalINN
    torch.manual_seed(0)
    base = ConditionalINN(latent_dim=128, cond_shape=[2048], n_flows=20, hidden=1024, depth=2)
    with torch.no_grad():
        base.train()(torch.randn(64, 128), torch.randn(64, 2048))
    base.eval()
    z = torch.randn(1, 2048)
    models = {"plain": base, "fast": copy.deepcopy(base).fast(True)}
    m = copy.deepcopy(base).fast(True); m.flow.fast_onednn = False; models["fast-noonednn"] = m
    models["fast-nocache"] = copy.deepcopy(base).fast(True, cache=False)
    import torch._inductor.config as icfg
    fr = copy.deepcopy(base)
    def frozen_inverse(v, z, _m=fr):
        return _m.flow.inverse(v, _m.embedder(z))
    icfg.freezing = True
    cf = torch.compile(frozen_inverse, dynamic=False)
    def sample_frozen(z, n=16, generator=None):
        v = torch.randn(n * z.shape[0], 128, generator=generator)
        return cf(v, z.repeat_interleave(n, 0))[0]
    def call(k):
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            if k == "compile-freeze":
                return sample_frozen(z, 16, g)
            return models[k].sample(z, n=16, generator=g)
    ref = call("plain")
    t0 = time.perf_counter(); call("compile-freeze"); print(f"freeze compile first call {time.perf_counter()-t0:.1f} s")
    keys = list(models) + ["compile-freeze"]
    for k in keys:
        print(k, "max|diff|", (call(k) - ref).abs().max().item())
    for rep in range(2):
        for _ in range(2):
            for k in keys: call(k)
        w = {k: [] for k in keys}
        for _ in range(11):
            for k in keys:
                t0 = time.perf_counter(); call(k); w[k].append(1e3 * (time.perf_counter() - t0))
        print(f"paper 16 samples, {threads} thread(s), round {rep}, load {os.getloadavg()}")
        for k in keys:
            q = statistics.quantiles(w[k], n=4)
            print(f"  {k:<15} median {statistics.median(w[k]):8.2f}  IQR {q[0]:7.2f}-{q[2]:7.2f}")
        sys.stdout.flush()
elif args.part == "a":
    sys.path.insert(0, os.environ["APPROOT"])
    import app
    from invint_hub import space
    sas, compile_s = {}, None
    for k in variants:
        reg = space.ModelRegistry(["mnist"], include_embedded=False, fast=(k == "fast"), examples_per_model=4)
        entry = reg.get("mnist")
        if k == "once":
            for t in entry.pipe.cinns.values():
                t.sample = types.MethodType(embed_once_sample, t)
        if k == "compile":
            for t in entry.pipe.cinns.values():
                compile_cinn(t)
        sas[k] = (app.SpaceApp(reg), entry)
    ex = str(sas["plain"][1].examples[0])
    layer = sas["plain"][0].default_layer("mnist")
    print("layer", layer, "example", ex)
    if "compile" in sas:
        t0 = time.perf_counter()
        sas["compile"][0].interpret("mnist", "upload", ex, None, True, layer, 16, 1.0, 0)
        print(f"compile: first interpret {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        sas["compile"][0].sweep("mnist", "upload", ex, None, True, 16, 1.0, 0)
        print(f"compile: first sweep (all layers) {time.perf_counter() - t0:.1f} s")
    # same outputs?
    outs = {k: sa.interpret("mnist", "upload", ex, None, True, layer, 16, 1.0, 0)[1] for k, (sa, _) in sas.items()}
    for rep in range(2):
        w = interleave({k: (lambda sa=sa: sa.interpret("mnist", "upload", ex, None, True, layer, 16, 1.0, 0))
                        for k, (sa, _) in sas.items()}, args.runs)
        report(w, f"(a) interpret handler, MNIST layer {layer}, n=16, {args.threads} thread(s), round {rep}")
        w = interleave({k: (lambda sa=sa: sa.sweep("mnist", "upload", ex, None, True, 16, 1.0, 0))
                        for k, (sa, _) in sas.items()}, max(5, args.runs // 2))
        report(w, f"(a) layer-sweep handler, MNIST all layers, n=16, {args.threads} thread(s), round {rep}")
else:
    from invint_hub.cinn import ConditionalINN
    torch.manual_seed(0)
    base = ConditionalINN(latent_dim=128, cond_shape=[2048], n_flows=20, hidden=1024, depth=2)
    with torch.no_grad():
        base.train()(torch.randn(64, 128), torch.randn(64, 2048))
    base.eval()
    z = torch.randn(1, 2048)
    models = {}
    for k in variants:
        if k == "plain":
            models[k] = base
        elif k == "fast":
            models[k] = copy.deepcopy(base).fast(True)
        elif k == "once":
            m = copy.deepcopy(base)
            m.sample = types.MethodType(embed_once_sample, m)
            models[k] = m
        elif k == "compile":
            models[k] = compile_cinn(copy.deepcopy(base))
    def call(k, mode=torch.no_grad):
        with mode():
            return models[k].sample(z, n=16, generator=torch.Generator().manual_seed(0))
    ref = call("plain")
    if "compile" in models:
        t0 = time.perf_counter(); call("compile"); print(f"compile time (first call): {time.perf_counter() - t0:.1f} s")
    for k in models:
        print(k, "max |diff| vs plain", (call(k) - ref).abs().max().item())
    fns = {k: (lambda k=k: call(k)) for k in models}
    if "once" in models:
        fns["once+infer"] = lambda: call("once", torch.inference_mode)
    for rep in range(2):
        w = interleave(fns, args.runs)
        report(w, f"(b) paper cINN (128, [2048], 20 flows, 1024, depth 2) 16 samples, {args.threads} thread(s), round {rep}")
