"""Latency of the Space as a browser user meets it (Playwright + chromium).

    python eval/bench_browser.py                         # embedded MNIST pipeline, 20 runs of each action
    python eval/bench_browser.py --runs 20 --app /tmp/before/app.py --app app.py   # A/B, clicks interleaved

Starts each ``--app`` script (default: this checkout's ``app.py``) as a subprocess on a free loopback port,
opens its page in headless chromium, uploads an example image (made as the Space makes its examples) and then,
for every run, sets a new seed and clicks **Interpret** (and **Layer sweep**) with the page's defaults (16
samples). The time of a run is measured inside the page: from the click until every result image of that action
is loaded and displayed (all ``<img>`` of the result components ``complete && naturalWidth > 0``, the sample
images with a ``src`` none of them had before the click, so they belong to this click) -- what a user waits for.
Also reported: when the result first reached the page (the first new image element appeared; its pixels may
still be loading), and the image requests the browser made per click (Resource Timing entries of ``<img>``)
with their encoded size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from eval.bench_app import app_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

# Per action: the button, the images that must be new (fresh) and the ones that must merely be displayed.
ACTIONS = {
    "interpret": dict(button="#run-interpret", fresh="#samples img", shown="#model-input img, #recon img"),
    "layer_sweep": dict(button="#run-sweep", fresh="#sweep img", shown="#model-input img, #recon img"),
}

# In the page: note the old srcs, click, poll every animation frame until the result is displayed.
MEASURE_JS = """
async ({button, fresh, shown, minFresh, timeoutMs}) => {
  const srcs = (sel) => Array.from(document.querySelectorAll(sel)).map((i) => i.currentSrc || i.src);
  const old = new Set(srcs(fresh));
  const ok = (img) => img.complete && img.naturalWidth > 0;
  const t0 = performance.now();
  let firstSeen = null;
  document.querySelector(button).click();
  return await new Promise((resolve) => {
    const tick = () => {
      const now = performance.now();
      const f = Array.from(document.querySelectorAll(fresh));
      const msg = f.some((i) => !old.has(i.currentSrc || i.src));
      if (msg && firstSeen === null) firstSeen = now - t0;
      const allNew = f.length >= minFresh && f.every((i) => !old.has(i.currentSrc || i.src));
      const s = Array.from(document.querySelectorAll(shown));
      if (allNew && f.every(ok) && s.every(ok)) {
        const imgs = performance.getEntriesByType("resource").filter(
          (e) => e.initiatorType === "img" && e.startTime >= t0);
        resolve({ms: now - t0, message_ms: firstSeen, fresh: f.length, shown: s.length, image_requests: imgs.length,
                 image_kb: imgs.reduce((a, e) => a + (e.encodedBodySize || 0), 0) / 1024});
      } else if (now - t0 > timeoutMs) {
        resolve({ms: null, message_ms: firstSeen, fresh: f.length, shown: s.length, image_requests: 0, image_kb: 0});
      } else {
        requestAnimationFrame(tick);
      }
    };
    requestAnimationFrame(tick);
  });
}
"""


def example_image(model: str) -> str:
    from invint_hub import InvariancePipeline, space

    pipe = InvariancePipeline.from_pretrained(model)
    examples, _ = space.build_examples(pipe, tempfile.mkdtemp(prefix="bench_browser_"), 2)
    return str(examples[0])


def summarize(runs: list[dict]) -> dict:
    ms = [r["ms"] for r in runs if r["ms"] is not None]
    msg = [r["message_ms"] for r in runs if r["message_ms"] is not None]
    out = {"runs": len(runs), "timeouts": len(runs) - len(ms)}
    if ms:
        out.update(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms))
    if msg:
        out["message_median_ms"] = statistics.median(msg)
    out["image_requests_per_click"] = statistics.median(r["image_requests"] for r in runs)
    out["image_kb_per_click"] = statistics.median(r["image_kb"] for r in runs)
    out["images_per_result"] = statistics.median(r["fresh"] + r["shown"] for r in runs)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", action="append", default=[], help="app.py script(s) to compare (default: ./app.py)")
    ap.add_argument("--model", default="mnist", help="embedded pipeline name or folder (default mnist)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--actions", default="interpret,layer_sweep")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of app.py")
    ap.add_argument("--timeout", type=float, default=60, help="seconds one click may take before it counts as failed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    apps = args.app or [str(ROOT / "app.py")]
    actions = [a.strip() for a in args.actions.split(",") if a.strip()]
    for a in actions:
        if a not in ACTIONS:
            sys.exit(f"unknown action {a!r} (known: {', '.join(ACTIONS)})")
    example = example_image(args.model)
    app_args = ["--model", args.model, "--examples", "2", "--threads", str(args.threads)]
    res: dict = {"apps": apps, "model": args.model, "runs": args.runs, "load_before": os.getloadavg(),
                 "cpus": os.cpu_count()}
    print(f"load average {os.getloadavg()[0]:.2f}; example {example}", flush=True)
    with ExitStack() as stack, sync_playwright() as p:
        urls = [stack.enter_context(app_server(app_args, script=a))[0] for a in apps]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pages = []
        for url in urls:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(120_000)
            pg.goto(url)
            pg.wait_for_selector("#interpret-image input[type=file]", state="attached")
            pg.locator("#interpret-image input[type=file]").set_input_files(example)
            pg.wait_for_selector("#interpret-image img")
            pages.append(pg)
        results = {(a, act): [] for a in range(len(apps)) for act in actions}
        seed = 1000
        for i in range(args.warmup + args.runs):
            for act in actions:
                for k, pg in enumerate(pages):  # interleaved: app A, app B, app A, ...
                    seed += 1
                    box = pg.get_by_label("Seed", exact=True)
                    box.fill(str(seed))
                    box.press("Tab")
                    pg.wait_for_timeout(150)
                    pg.evaluate("performance.clearResourceTimings()")
                    cfg = dict(ACTIONS[act], minFresh=1, timeoutMs=1000 * args.timeout)
                    r = pg.evaluate(MEASURE_JS, cfg)
                    if args.verbose:
                        print(f"  {'warm-up ' if i < args.warmup else ''}{Path(apps[k]).parent.name}/{act}: {r}",
                              flush=True)
                    if i >= args.warmup:
                        results[(k, act)].append(r)
        browser.close()
    res["load_after"] = os.getloadavg()
    res["results"] = {f"{apps[k]}::{act}": summarize(v) for (k, act), v in results.items()}
    print(f"\n{'app :: action':<52}{'median':>8}{'min':>7}{'max':>7}{'msg':>7}{'img req':>8}{'img KB':>8}  (ms)")
    for name, s in res["results"].items():
        f = lambda k: f"{s[k]:>7.0f}" if k in s else "      -"  # noqa: E731
        print(f"{name[-52:]:<52} {f('median_ms')}{f('min_ms')}{f('max_ms')}{f('message_median_ms')}"
              f"{s['image_requests_per_click']:>8.0f}{s['image_kb_per_click']:>8.1f}"
              + (f"  timeouts {s['timeouts']}" if s["timeouts"] else ""))
    print(f"load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
