"""Gradio Space: see, layer by layer, what a classifier keeps and what it is invariant to.

    python app.py                              # the embedded default pipeline, offline
    python app.py --model org/repo --model ./my_pipeline
    INVINT_MODELS="org/repo,./my_pipeline" python app.py

Rombach, Esser, Ommer: Making Sense of CNNs: Interpreting Deep Representations & Their
Invariances with INNs (ECCV 2020). The UI lives here: the layout, and handlers that format the
results of the pipeline's batched views (``InvariancePipeline.interpret`` and co., the concept views
of ``invint_hub.concepts``); input decoding, the model registry and rendering are in
``invint_hub.space``. The handlers are plain functions, so they can be tested without a server.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from invint_hub import concepts, space  # noqa: E402
from invint_hub.space import video as space_video  # noqa: E402

log = logging.getLogger("invint_hub.app")

TITLE = "Making Sense of CNNs: what each layer keeps, and what it is invariant to"
INTRO = """
A classifier's layer turns an image x into a representation z = Φ(x). An autoencoder (E, D) and a
conditional INN t split the autoencoder's code into **z** and the **invariances v** of the layer:
every v ~ N(0, I) decodes, through D(t⁻¹(v | z)), to an image the layer cannot tell apart from x.
**What stays the same across samples is what the layer encodes; what varies is what it ignores.**
([paper](https://arxiv.org/abs/2008.01777): Rombach, Esser, Ommer, ECCV 2020)
"""
CSS = """
.pixelated img { image-rendering: pixelated; }
.input-image img { image-rendering: pixelated; width: 100% !important; height: 100% !important; object-fit: contain; }
#mix-examples td, #concept-examples td { padding: 2px 8px !important; }
#mix-examples .container, #mix-examples img, #concept-examples .container, #concept-examples img {
  width: 40px !important; height: 40px !important; }
#summary p { margin: 0.2em 0; }
footer { display: none !important; }
"""
COMPUTE = dict(concurrency_id="models")  # every model computation goes through one queue group
EXAMPLE_PAIRS = [(0, 1), (2, 3), (4, 7), (5, 6), (8, 9), (1, 7)]
MAX_CONCEPT_SLIDERS = 6
NO_CONCEPTS = "this pipeline has no concept model e; pick one that has (e.g. the embedded colormnist)"


def safe_preprocess(payload: Any):
    """Read an uploaded image with invint_hub's checks; bad files become one-line ``gr.Error`` messages.

    Non-images, truncated files, decompression bombs (e.g. a 20000x20000 header) and odd
    modes are handled by ``invint_hub.space.load_image``; the value is a decoded PIL image, which the
    handlers use as it is (each upload is decoded once).
    """
    if payload is None:
        return None
    try:
        return space.load_image(payload)
    except ValueError as e:
        raise gr.Error(space.one_line(e), print_exception=False) from None
    except Exception as e:  # anything PIL throws at a hostile file
        raise gr.Error(f"could not read the image ({e.__class__.__name__})", print_exception=False) from None


def SafeImage(**kwargs) -> gr.Image:
    """A ``gr.Image`` input (PIL value) whose uploads are read by ``safe_preprocess``.

    (An instance attribute rather than a subclass: Gradio writes a ``.pyi`` stub next to any
    module that subclasses a component.)
    """
    comp = gr.Image(type="pil", **kwargs)
    comp.preprocess = safe_preprocess  # type: ignore[method-assign]
    return comp


def PairExamples(samples: list[list[str]], elem_id: str) -> gr.Dataset:
    """Clickable example pairs (two images per row)."""
    return gr.Dataset(components=[gr.Image(visible=False, format="png"), gr.Image(visible=False, format="png")],
                      samples=samples, type="index", label="Example pairs (click to run)", layout="table",
                      samples_per_page=6, elem_id=elem_id)


def ResultImage(label: str, elem_id: str) -> gr.Image:
    """A rendered result grid, downloadable and zoomable."""
    return gr.Image(label=label, show_label=False, format="png", interactive=False, elem_id=elem_id,
                    buttons=["download", "fullscreen"])


def ui_errors(fn: Callable) -> Callable:
    """Turn library errors into a one-line message in the UI (no stack trace); the server stays up."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise gr.Error(space.one_line(e), print_exception=False) from None
        except Exception as e:  # a bug: log it, show one line
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"internal error ({e.__class__.__name__}): {space.one_line(e)}", print_exception=False) from None

    return wrapper


def image_files(fn: Callable, folder: str) -> Callable:
    """Hand the handler's PIL images to Gradio as PNG files already in its cache ``folder`` (``space.png_file``):
    written once per content and atomically, so concurrent requests for the same image never fetch a partly
    rewritten file, and Gradio neither re-encodes nor copies them."""

    @functools.wraps(fn)
    def wrapper(*args):
        return tuple(space.png_file(o, folder) if isinstance(o, Image.Image) else o for o in fn(*args))

    return wrapper


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


class SpaceApp:
    """The Space's handlers (plain functions of plain values, so tests can call them directly)."""

    def __init__(self, registry: space.ModelRegistry, top_k: int = 5):
        self.registry = registry
        self.top_k = top_k

    # --- models ---------------------------------------------------------------------
    def model_info(self, name: str | None) -> str:
        e = self.registry.get(name)
        p = e.pipe
        assert p is not None
        names = p.class_names
        classes = ", ".join(names[:10]) + (f", … ({len(names)} classes)" if len(names) > 10 else "")
        return (
            f"**{e.label}** · data `{p.info.get('dataset', '?')}` · images {p.channels}×{p.image_size}×{p.image_size} · "
            f"classifier `{p.backbone.arch}` · layers {' → '.join(f'`{l}`' for l in p.layers)} · classes: {classes}  \n"
            f"**Understands:** {p.domain}. Other images get an out-of-domain warning"
            + (" (calibrated)." if p.ood else " only once the pipeline is calibrated (eval/ood_calibration.py).")
            + self.weak_warning_note(p)
        )

    @staticmethod
    def weak_warning_note(pipe) -> str:
        """Where the calibrated warning misses much of an out-of-domain set (measured rates below 90 %), the rates in
        plain words: the absence of a warning then says little."""
        rates = (pipe.ood or {}).get("ood_rates", {})
        weak = {k: v for k, v in rates.items() if v < 0.9}
        if not weak:
            return ""
        return (" **It misses many:** measured, it fires on only "
                + ", ".join(f"{100 * v:.1f}% of {k.replace(' (as is)', '')}" for k, v in weak.items())
                + " (the autoencoder reconstructs such images about as well as its own), so no warning does not mean "
                  "the image is one the model understands.")

    # --- honesty: what was done to an upload, and whether it is in the model's domain ---------------
    @staticmethod
    def domain_warning(pipe, score: float | None, ood: bool | None) -> str:
        """A visible warning when the measured domain score is above the calibrated threshold, else ''."""
        if not ood or score is None:
            return ""
        c = pipe.ood
        return (f"⚠️ **Out of domain.** This model understands {pipe.domain}. This input's reconstruction error "
                f"{score:.3f} is above the threshold {c['threshold']:.3f} (exceeded by {100 * c['test_rate']:.0f}% of test "
                "images), so the prediction and samples say little about it.")

    def check_uploads(self, model: str, convert: bool, *images: Any) -> str:
        """Markdown for the uploads of one tab: a one-line notice of what reading each did to it, and the
        out-of-domain warning (the score of the model input, after the tab's conversion); '' when nothing to say."""
        e = self.registry.get(model)
        pipe = e.pipe
        lines = []
        named = len(images) > 1
        for k, value in enumerate(images):
            if value is None:
                continue
            img = self._image(value)
            x, _ = space.prepare_input(pipe, img, convert=bool(convert), domain=e.domain)
            converted = bool(convert) and e.domain != "photo"
            notes = space.upload_notices(img, pipe.channels, pipe.image_size, cropped=not converted)
            tag = f"Image {'ABC'[k] if k < 3 else k + 1}: " if named else ""
            if pipe.ood is not None:
                score = float(pipe.domain_score(x)[0])
                warn = self.domain_warning(pipe, score, bool(pipe.out_of_domain(x, torch.tensor([score]))[0]))
                if warn:
                    lines.append(tag + warn)
            if notes:
                lines.append(f"ℹ️ {tag}{img.width}x{img.height} {img.mode}: " + "; ".join(notes) + ".")
        return "  \n".join(lines)

    @staticmethod
    def _variance_note(ratios: dict[str, float | None]) -> str:
        over = {l: r for l, r in ratios.items() if r is not None and r > 1}
        if not over:
            return ""
        return ("Variance explained is shown clipped at 100%: at " + ", ".join(f"`{l}` the samples spread "
                f"{100 * r:.0f}%" for l, r in over.items()) + " of the code's data variance (an estimate from few samples; "
                "a representation unlike the training data can let the cINN spread wider than the data does).")

    @staticmethod
    def _cosine_line(layer: str, cos: float | None, ref: float | None) -> str:
        return (f"`{layer}`: re-encoding cosine cos(Φ(sample), Φ(x)) **{cos:.2f}**"
                + (f" (random pairs of test images: {ref:.2f})" if ref is not None else " (no random-pair reference recorded)"))

    def default_layer(self, name: str | None) -> str:
        layers = self.registry.get(name).pipe.layers  # type: ignore[union-attr]
        return layers[len(layers) // 2]

    def examples(self, name: str | None) -> tuple[list[list[str]], list[str]]:
        e = self.registry.get(name)
        return [[str(p)] for p in e.examples], list(e.example_labels)

    def example_pairs(self, name: str | None) -> tuple[list[list[str]], list[str]]:
        e = self.registry.get(name)
        n = len(e.examples)
        pairs = [(i, j) for i, j in EXAMPLE_PAIRS if i < n and j < n] or ([(0, 0)] if n else [])
        return ([[str(e.examples[i]), str(e.examples[j])] for i, j in pairs],
                [f"{e.example_labels[i].split(' (')[0]} × {e.example_labels[j].split(' (')[0]}" for i, j in pairs])

    def example_image(self, name: str | None, index: int | None, pair_slot: int | None = None):
        """The example at ``index`` (a path), or of a pair when ``pair_slot`` is 0 or 1."""
        if index is None:
            raise ValueError("no example selected")
        samples = self.example_pairs(name)[0] if pair_slot is not None else self.examples(name)[0]
        if not 0 <= int(index) < len(samples):
            raise ValueError(f"no example number {index}")
        return samples[int(index)][pair_slot or 0]

    # --- input --------------------------------------------------------------------------
    @staticmethod
    def _image(value: Any) -> Image.Image:
        """A SafeImage value is already decoded; other callers (scripts, tests) may pass a path, bytes, ..."""
        return value if isinstance(value, Image.Image) else space.load_image(value)

    def _input(self, entry: space.ModelEntry, source: str, image: Any, sketch: Any, convert: bool):
        pipe = entry.pipe
        assert pipe is not None
        if source == "draw":
            img = space.sketch_to_image(sketch, entry.domain, pipe.channels)
            return pipe.preprocess(img), f"drawing → centred {entry.domain} → {pipe.channels}x{pipe.image_size}px"
        return space.prepare_input(pipe, self._image(image), convert=convert, domain=entry.domain)

    def _two_inputs(self, entry: space.ModelEntry, a: Any, b: Any, convert: bool, missing: str):
        if a is None or b is None:
            raise ValueError(missing)
        return tuple(space.prepare_input(entry.pipe, self._image(v), convert=convert, domain=entry.domain)[0]
                     for v in (a, b))

    def _label(self, pipe, probs: torch.Tensor) -> dict[str, float]:
        k = min(self.top_k, probs.numel())
        top = probs.topk(k)
        return {space.class_name(pipe, int(c)): float(p) for p, c in zip(top.values, top.indices)}

    # --- Interpret ---------------------------------------------------------------------
    def interpret(self, model: str, source: str, image: Any, sketch: Any, convert: bool, layer: str,
                  n: float, temperature: float, seed: float):
        """-> top-k, one image (model input, reconstruction, the samples captioned with their class), summary."""
        with self.registry.use(model) as e:
            pipe = e.pipe
            x, note = self._input(e, source, image, sketch, convert)
            r = pipe.interpret(x, layer, *space.check_sampling(n, temperature, seed))
        c_in = int(r.probs.argmax())
        cls = space.class_name(pipe, c_in)
        preds = [int(c) for c in r.sample_pred]
        # one image per click, not N + 2 files: each file is a request (browser) or a download (client)
        grid = space.interpret_grid(r.x[0], r.recon[0], r.samples, [space.class_name(pipe, c) for c in preds],
                                    [c != c_in for c in preds])
        summary = (
            f"**Layer `{layer}`**: v accounts for **{_pct(r.variance_explained)}** of the autoencoder code's variance "
            f"(0% = the layer pins the image down, 100% = it keeps nothing of it); **{_pct(r.class_agreement)}** of the "
            f"{len(preds)} samples are classified as **{cls}**, like the input.  \n<small>Input: {note}.</small>"
        )
        extra = "  \n".join(t for t in (
            self.domain_warning(pipe, r.domain_score, r.out_of_domain),
            self._cosine_line(layer, r.reencode_cosine, r.random_pair_cosine)
            + " — how much of x's representation the samples keep (1 = all of it)",
            self._variance_note({layer: r.variance_ratio})) if t)
        return self._label(pipe, r.probs), grid, summary, extra

    def sweep(self, model: str, source: str, image: Any, sketch: Any, convert: bool,
              n: float, temperature: float, seed: float):
        """-> top-k, grid (rows = layers; the input and D(E(x)) first), variance plot, agreement plot, summary."""
        with self.registry.use(model) as e:
            pipe = e.pipe
            x, note = self._input(e, source, image, sketch, convert)
            s = pipe.layer_sweep(x, *space.check_sampling(min(int(n), 16), temperature, seed))
        layers = list(s.samples)
        cls = int(s.probs.argmax())
        labels = [f"{l}  ({_pct(s.variance_explained[l])})" for l in layers]
        grid = space.sweep_grid(s, functools.partial(space.class_name, pipe), labels)
        var = pd.DataFrame({"layer": layers,
                            "variance explained by v (%)": [100 * (s.variance_explained[l] or 0.0) for l in layers]})
        agree = pd.DataFrame({"layer": layers, "class agreement (%)": [100 * s.class_agreement[l] for l in layers]})
        summary = (
            f"Each row decodes the **same {len(s.samples[layers[0]])} invariance samples v** with the representation of one "
            f"layer (percentages: variance of the autoencoder code explained by v). Orange frames: samples the classifier "
            f"does not put in class **{space.class_name(pipe, cls)}**.  \n<small>Input: {note}.</small>"
        )
        extra = "  \n".join(t for t in (
            self.domain_warning(pipe, s.domain_score, s.out_of_domain),
            "Re-encoding cosine cos(Φ_L(sample), Φ_L(x)) per layer, with the random-pair reference: "
            + "; ".join(f"`{l}` **{s.reencode_cosine[l]:.2f}**"
                        + (f" (random {s.random_pair_cosine[l]:.2f})" if s.random_pair_cosine[l] is not None else "")
                        for l in layers),
            self._variance_note(s.variance_ratio)) if t)
        return self._label(pipe, s.probs), grid, var, agree, summary, extra

    # --- Mix ------------------------------------------------------------------------------
    def mix(self, model: str, image_a: Any, image_b: Any, convert: bool):
        """-> grid (A's representation with B's invariances, and B's with A's, per layer), summary."""
        with self.registry.use(model) as e:
            pipe = e.pipe
            xa, xb = self._two_inputs(e, image_a, image_b, convert, "mixing needs two images: give both A and B")
            m = pipe.mix_layers(xa, xb)
        layers = pipe.layers
        name = functools.partial(space.class_name, pipe)
        pa, pb = int(m.pred[0]), int(m.pred[1])
        rows = [[m.x[0], m.x[1]] + [m.a_with_b[l][0] for l in layers],
                [m.x[1], m.x[0]] + [m.b_with_a[l][0] for l in layers]]
        caps = [[name(pa), name(pb)] + [name(m.pred_a_with_b[l]) for l in layers],
                [name(pb), name(pa)] + [name(m.pred_b_with_a[l]) for l in layers]]
        grid = space.compose_grid(rows, ["z of A, v of B", "z of B, v of A"], ["z from", "v from"] + layers, caps, cell=80)
        summary = (
            "Each cell decodes one image's representation at that layer with the other image's invariances: "
            "D(t⁻¹(t(E(x_B)|Φ(x_B)) | Φ(x_A))). Where the decode still looks like the **z** image, the layer keeps that "
            "content; where it takes on the **v** image's looks, the layer is invariant to them. Captions: the classifier's "
            "prediction for each image."
        )
        return grid, summary

    # --- Adversarial ----------------------------------------------------------------------
    def attack(self, model: str, image: Any, convert: bool, eps: float = 0.3, seed: float = 0):
        """-> original, FGSM, noise images; their top-k; grid of what each layer sees; summary."""
        with self.registry.use(model) as e:
            pipe = e.pipe
            x, _ = space.prepare_input(pipe, self._image(image), convert=convert, domain=e.domain)
            a = pipe.attack(x, eps, seed, n=8)
        layers = pipe.layers
        name = functools.partial(space.class_name, pipe)
        preds = a.probs.argmax(1).tolist()
        rows, caps, marks = [], [], []
        for i in range(3):
            decs = [a.seen[l][i] for l in layers]
            pl = [a.seen_pred[l][i] for l in layers]
            rows.append([a.x[i], a.recon[i]] + decs)
            caps.append([name(preds[i]), name(a.recon_pred[i])] + [name(c) for c in pl])
            marks.append([preds[i] != preds[0], a.recon_pred[i] != preds[0]] + [c != preds[0] for c in pl])
        grid = space.compose_grid(rows, ["original", f"FGSM eps={a.eps:g}", f"random signs eps={a.eps:g}"],
                                  ["input", "D(E(input))"] + layers, caps, cell=80, highlight=marks)
        conf = a.probs.max(1).values.tolist()
        fooled = [l for l in layers if a.seen_pred[l][1] == preds[1]] if preds[1] != preds[0] else []
        summary = (
            f"FGSM (ε = {a.eps:g} on the [-1, 1] scale) moves the prediction from **{name(preds[0])}** ({100 * conf[0]:.0f}%) "
            f"to **{name(preds[1])}** ({100 * conf[1]:.0f}%); random sign noise of the same size gives **{name(preds[2])}** "
            f"({100 * conf[2]:.0f}%).  \n"
            + (f"Layers whose view of the attacked image is classified as **{name(preds[1])}**: "
               f"{', '.join(f'`{l}`' for l in fooled) or 'none'}.  \n" if fooled or preds[1] != preds[0] else
               "The attack did not change the prediction: try a larger ε.  \n")
            + "Each layer's view: D(t⁻¹(v_orig | Φ_L(input))) with the original image's invariances v_orig, so only what "
            "the layer's representation changed shows. Orange frames: class differs from the original prediction."
        )
        imgs = space.tensor_images(a.x)
        v_grids = []
        for samples, spred in ((a.samples_clean, a.sample_pred_clean), (a.samples_attacked, a.sample_pred_attacked)):
            v_grids.append(space.compose_grid(
                [list(samples[l]) for l in layers], layers,  # the same row labels: the two grids line up
                [f"v{j + 1}" for j in range(len(samples[layers[0]]))],
                [[name(c) for c in spred[l]] for l in layers], cell=56,
                highlight=[[c != preds[0] for c in spred[l]] for l in layers]))
        extra = "  \n".join(t for t in (
            self.domain_warning(pipe, a.domain_score, a.out_of_domain),
            f"**v samples**: the same {len(a.samples_clean[layers[0]])} invariance samples v (seed {int(seed)}) decoded "
            "with each layer's z of the clean image (left) and of the FGSM image (right): D(t⁻¹(v | Φ_L(.))). Orange "
            "frames: class differs from the original prediction.") if t)
        return (imgs[0], imgs[1], imgs[2], self._label(pipe, a.probs[0]), self._label(pipe, a.probs[1]),
                self._label(pipe, a.probs[2]), grid, summary, v_grids[0], v_grids[1], extra)

    # --- Concepts ---------------------------------------------------------------------------
    def concept_intro(self, name: str | None) -> str:
        """What the Concepts tab can do with ``name`` (and where to go if it has no concept model)."""
        e = self.registry.get(name)
        c = e.pipe.concepts  # type: ignore[union-attr]
        if c is None:
            others = [n for n in self.registry.concept_models() if n != e.name]
            hint = (f" Pick **{others[0]}** in the Model menu (or click the button below)." if others else
                    " Train one with `python -m invint_hub.train concepts --config configs/colormnist.yaml`.")
            return f"**{e.label}** has no concept model e.{hint}"
        sizes = ", ".join(f"`{n}` ({s} dims)" for n, s in zip(c.factor_names, c.factor_sizes))
        return (f"The concept INN e splits the autoencoder code of **{e.label}** into factors: {sizes}. "
                "**Transfer** takes one concept from the source image; **Edit** walks along a concept's factor.")

    def concept_switch(self, name: str | None):
        """(label, target model) of the 'switch to a model with concepts' button; target None when not needed."""
        e = self.registry.get(name)
        others = [n for n in self.registry.concept_models() if n != e.name]
        if e.pipe.concepts is not None or not others:  # type: ignore[union-attr]
            return None
        return others[0]

    def concept_sliders(self, name: str | None) -> list[str]:
        """Slider labels of ``name``'s concepts (at most MAX_CONCEPT_SLIDERS)."""
        c = self.registry.get(name).pipe.concepts  # type: ignore[union-attr]
        return [] if c is None else c.concept_names[:MAX_CONCEPT_SLIDERS]

    def transfer(self, model: str, target: Any, source: Any, amount: float = 1.0):
        """-> grid (target with each concept of the source, and source with the target's), summary."""
        with self.registry.use(model) as e:
            pipe = e.pipe
            xt, xs = self._two_inputs(e, target, source, False,
                                      "concept transfer needs two images: give both the target and the source")
            if pipe.concepts is None:
                raise ValueError(NO_CONCEPTS)
            t = concepts.concept_transfer(pipe, xt, xs, float(amount))
        name = functools.partial(space.class_name, pipe)
        rows = [[t.x[0], t.x[1]] + list(t.rows[0]), [t.x[1], t.x[0]] + list(t.rows[1])]
        caps = [[name(t.pred[0]), name(t.pred[1])] + [name(c) for c in t.row_pred[0]],
                [name(t.pred[1]), name(t.pred[0])] + [name(c) for c in t.row_pred[1]]]
        grid = space.compose_grid(rows, ["target, c from source", "source, c from target"], ["image", "concept from"] + t.concepts,
                                  caps, cell=80)
        summary = (
            f"Column *c*: the row's image with concept *c* set to the other image's (amount {t.amount:g}; 0 = unchanged, "
            "1 = full transfer): D(e⁻¹(e(E(x)) with e_c ← e_c(other))). Everything else of the image (the other concepts "
            "and the residual) stays. Captions: the classifier's prediction."
        )
        return grid, summary

    def edit(self, model: str, image: Any, seed: float, *amounts: float):
        """-> edited image, grid (one row per concept, walking -3..3), summary."""
        with self.registry.use(model) as e:
            pipe = e.pipe
            x, _ = space.prepare_input(pipe, self._image(image), convert=False, domain=e.domain)
            names = self.concept_sliders(model)
            if not names:
                raise ValueError(self.concept_intro(model).replace("**", ""))
            r = concepts.concept_edit(pipe, x, dict(zip(names, amounts)), int(seed))
        name = functools.partial(space.class_name, pipe)
        rows = [list(w) for w in r.walks]
        caps = [[name(c) for c in p] for p in r.walk_pred]
        grid = space.compose_grid(rows, r.concepts, [f"{a:+g}" for a in r.steps], caps, cell=72,
                                  highlight=[[c != r.pred[1] for c in p] for p in r.walk_pred])
        moved = ", ".join(f"`{c}` {a:+g}" for c, a in r.amounts.items() if a) or "nothing (all sliders at 0)"
        summary = (
            f"Edited: {moved} (in prior standard deviations, along a direction inside each factor drawn with seed "
            f"{int(seed)}). Prediction: input **{name(r.pred[0])}**, reconstruction **{name(r.pred[1])}**, edited "
            f"**{name(r.pred[2])}**.  \nBelow: each concept alone, from -3 to +3; orange frames: class differs from the "
            "reconstruction's."
        )
        return space.tensor_images(r.edited)[0], grid, summary

    def concept_layers(self, model: str):
        """-> Markdown table: share of each concept's variance that each layer's representation fixes."""
        with self.registry.use(model) as e:
            pipe = e.pipe
            if pipe.concepts is None:
                raise ValueError(self.concept_intro(model).replace("**", ""))
            table = concepts.concept_layers(pipe)
        names = pipe.concepts.factor_names
        lines = ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| `{l}` | " + " | ".join(f"{100 * table[l][c]:.0f}%" for c in names) + " |" for l in pipe.layers]
        return ("Share of each concept's variance that the layer's representation z fixes (the paper's Fig. 4): "
                "100% = the layer encodes the concept, 0% = it is invariant to it. 64 images the pipeline generates, "
                "8 samples of v each.\n\n" + "\n".join(lines))


    # --- Compare ----------------------------------------------------------------------------
    def compare_partners(self, name: str | None) -> tuple[list[tuple[str, str]], str]:
        """(dropdown choices of the models that share ``name``'s autoencoder, a plain-words note)."""
        e = self.registry.get(name)
        partners = self.registry.compare_partners(e.name)
        choices = [(self.registry.label(n), n) for n in partners]
        if not partners:
            return [], (f"No other model here shares **{e.label}**'s autoencoder, so there is nothing to compare it with: "
                        "Compare decodes the same v with two networks, which needs one decoder. Pick a model that "
                        "shares one (pipelines made with `autoencoder.from`, or whose pipeline.json names "
                        "`../<pipeline>/autoencoder`).")
        return choices, (f"{len(partners)} model{'s' if len(partners) > 1 else ''} here share{'' if len(partners) > 1 else 's'} "
                         f"**{e.label}**'s autoencoder.")

    def compare_layers(self, name: str | None, prefer: str | None = None) -> tuple[list[str], str | None]:
        """(layers of ``name``, the one to select: ``prefer`` if it has it, else its default layer)."""
        if not name:
            return [], None
        layers = self.registry.get(name).pipe.layers  # type: ignore[union-attr]
        return layers, prefer if prefer in layers else self.default_layer(name)

    def compare(self, model: str, model_b: str | None, image: Any, convert: bool, layer_a: str, layer_b: str,
                n: float, temperature: float, seed: float):
        """-> the first model's grid, the second's (the same v decoded with each network's z), summary."""
        if not model_b:
            raise ValueError(self.compare_partners(model)[1].replace("**", ""))
        if image is None:
            raise ValueError("give an image to compare the two models on")
        if not layer_a or not layer_b:
            raise ValueError("pick a layer for each model")
        with self.registry.use_many(model, model_b) as (ea, eb):
            x, note = space.prepare_input(ea.pipe, self._image(image), convert=convert, domain=ea.domain)
            n_, t_, s_ = space.check_sampling(n, temperature, seed)
            c = ea.pipe.compare(eb.pipe, x, layer_a, layer_b, n=n_, seed=s_, temperature=t_)  # type: ignore[union-attr]
        grids = [space.compare_grid(side, functools.partial(space.class_name, e.pipe),
                                    f"{tag}: {side.network} · layer {side.layer}", e.label)
                 for tag, side, e in (("A", c.a, ea), ("B", c.b, eb))]

        def line(tag: str, side, e) -> str:
            return (f"**{tag}: {e.label}** (`{side.network}`, layer `{side.layer}`) predicts **{side.class_name}** "
                    f"({100 * side.probability:.0f}%); v explains **{_pct(side.variance_explained)}** of the code's "
                    f"variance; {_pct(side.class_agreement)} of its samples are {side.class_name}")

        summary = (
            f"The **same {len(c.v)} invariance samples v** (seed {s_}, temperature {t_:g}) decoded with each network's "
            "representation z of this image: D(t_A⁻¹(v | z_A)) and D(t_B⁻¹(v | z_B)), through the one autoencoder both "
            "share. What stays fixed in a grid is what that network's layer keeps; what the two grids change "
            "differently is where the networks differ (the official demo's texture-bias mode).  \n"
            + line("A", c.a, ea) + ".  \n" + line("B", c.b, eb) + "."
            + ("  \n<small>Each grid is captioned with its own network's classes; orange frames: a class other than "
               f"that network's class of the input. Input: {note}.</small>")
        )
        extra = self._variance_note({f"A {c.a.layer}": c.a.variance_ratio, f"B {c.b.layer}": c.b.variance_ratio})
        return grids[0], grids[1], summary + (f"  \n{extra}" if extra else "")

    # --- Video ----------------------------------------------------------------------------
    def video(self, model: str, video_file: Any, still: Any, layer: str, convert: bool = True,
              convert_frames: bool = False, fmt: str = "mp4", progress: Any = None):
        """-> result video (input frame | the still's representation with the frame's invariances), summary."""
        if still is None:
            raise ValueError("the video mode needs a still image too: its representation z is decoded with each "
                             "frame's invariances v")
        report = (lambda f, d: progress(f, desc=d)) if progress is not None else None
        with self.registry.use(model) as e:
            pipe = e.pipe
            xs, _ = space.prepare_input(pipe, self._image(still), convert=convert, domain=e.domain)
            path, m, clip = space_video.video_invariances(pipe, video_file, xs, layer, convert=convert_frames,
                                                          domain=e.domain, fmt=fmt, progress=report)
        name = functools.partial(space.class_name, pipe)
        n = m.frames.shape[0]
        kept = float((m.mixed_pred == m.still_pred).float().mean())
        frame_cls = torch.bincount(m.frame_pred).argmax().item()
        summary = (
            f"{n} frames at {clip.fps:.3g} fps ({clip.seconds:.1f} s, {clip.width}x{clip.height} {clip.codec}). Right: "
            f"D(t⁻¹(v_frame | Φ(still))) at layer `{layer}`, the still image's representation z with each frame's "
            f"invariances v. **{100 * kept:.0f}%** of these frames are classified as **{name(m.still_pred)}** like the "
            f"still image (the input frames: mostly **{name(frame_cls)}**). What moves on the right is what the layer "
            "is invariant to."
        )
        return str(path), summary

    def video_example(self, model: str | None) -> tuple[str, str]:
        """A clip made from one example image (a digit moving and turning) and another example as the still."""
        e = self.registry.get(model)
        if not e.examples:
            raise ValueError("this model has no example images")
        moving, still = e.examples[min(3, len(e.examples) - 1)], e.examples[min(8, len(e.examples) - 1)]
        path = Path(moving).parent / "example_video.mp4"
        if not path.is_file():  # made once per model; a unique temporary name, so concurrent clicks do not clash
            fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=path.parent)
            os.close(fd)
            space_video.make_example_video(moving, tmp)
            os.replace(tmp, path)
        return str(path), str(still)

def build_demo(models: space.ModelRegistry | list[str] | None = None, max_concurrency: int = 4) -> gr.Blocks:
    """The Blocks app. ``models``: a registry, or extra model names besides the embedded pipelines.

    The default model is loaded (and its examples made) here, so the first request is fast.
    """
    registry = models if isinstance(models, space.ModelRegistry) else space.ModelRegistry(models or [])
    app = SpaceApp(registry)
    default = registry.default
    registry.get(default)
    ex, _ = app.examples(default)
    pairs, _ = app.example_pairs(default)
    layers = registry.get(default).pipe.layers  # type: ignore[union-attr]
    is_digit = registry.get(default).domain == "digit"
    go = dict(COMPUTE, concurrency_limit=max_concurrency)

    with gr.Blocks(title="invint_hub: Making Sense of CNNs", fill_width=False) as demo:
        demo.space_app = app  # type: ignore[attr-defined]
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            model = gr.Dropdown(registry.choices(), value=default, label="Model (pipeline)", scale=1, min_width=220)
            info = gr.Markdown(app.model_info(default), elem_id="model-info")
        convert_help = "Grayscale, invert a bright background, centre the strokes MNIST-style"

        with gr.Tabs():
            # ---------------------------------------------------------------- Interpret
            with gr.Tab("Interpret", id="interpret"):
                source = gr.State("upload")
                with gr.Row():
                    with gr.Column(scale=2, min_width=280):
                        with gr.Tabs() as input_tabs:
                            with gr.Tab("Upload / paste", id="upload") as tab_up:
                                image = SafeImage(sources=["upload", "clipboard"], label="Image",
                                                  height=260, format="png", elem_id="interpret-image",
                                                  elem_classes="input-image")
                            with gr.Tab("Draw", id="draw") as tab_draw:
                                sketch = gr.Sketchpad(type="pil", label="Draw (pick the brush tool first)", canvas_size=(280, 280),
                                                      brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                                                      format="png", height=320, elem_id="sketch")
                        convert = gr.Checkbox(value=is_digit, label="Convert to the model's domain", info=convert_help,
                                              visible=is_digit)
                        interp_check = gr.Markdown(elem_id="interpret-check")
                        examples = gr.Dataset(components=[gr.Image(visible=False, format="png")], samples=ex,
                                              type="index", label="Examples (click to run)",
                                              samples_per_page=12, layout="gallery", elem_id="interpret-examples")
                    with gr.Column(scale=5):
                        with gr.Row():
                            layer = gr.Dropdown(layers, value=app.default_layer(default), label="Layer", min_width=120)
                            n = gr.Slider(1, space.MAX_SAMPLES, value=16, step=1, label="Samples N")
                            temperature = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Temperature of v")
                            seed = gr.Number(0, precision=0, minimum=0, label="Seed", min_width=90)
                            dice = gr.Button("New seed", scale=0, min_width=90, size="sm")
                        with gr.Row():
                            run = gr.Button("Interpret layer", variant="primary", elem_id="run-interpret")
                            run_sweep = gr.Button("Layer sweep (all layers)", variant="secondary", elem_id="run-sweep")
                        with gr.Row():
                            top = gr.Label(num_top_classes=5, label="Prediction (top 5)", min_width=160)
                            summary = gr.Markdown(elem_id="summary")
                        interp_extra = gr.Markdown(elem_id="interpret-extra")
                        gr.Markdown("The model input, its reconstruction D(E(x)) and the **samples** D(t⁻¹(v | z)) with "
                                    "v ~ N(0, T²I); captions: the classifier's prediction; orange frames: a class other "
                                    "than the input's", elem_id="samples-title")
                        samples_img = ResultImage("Model input, reconstruction and samples", "samples")
                with gr.Accordion("Layer sweep: every layer, the same v (click \"Layer sweep\")", open=False) as sweep_box:
                    sweep_md = gr.Markdown(elem_id="sweep-summary")
                    sweep_extra = gr.Markdown(elem_id="sweep-extra")
                    sweep_img = ResultImage("Layer sweep", "sweep")
                    with gr.Row():
                        var_plot = gr.BarPlot(x="layer", y="variance explained by v (%)", sort=layers, y_lim=[0, 100],
                                              title="Variance of the autoencoder code explained by v", height=260)
                        agree_plot = gr.BarPlot(x="layer", y="class agreement (%)", sort=layers, y_lim=[0, 100],
                                                title="Samples classified like the input", height=260)

            # ---------------------------------------------------------------- Mix
            with gr.Tab("Mix", id="mix"):
                gr.Markdown("Decode **A's representation with B's invariances** (and B's with A's) at every layer: "
                            "where does content stop and invariance begin?")
                with gr.Row():
                    img_a = SafeImage(sources=["upload", "clipboard"], label="Image A (its representation z)", height=220,
                                      format="png", elem_classes="input-image", elem_id="mix-a")
                    img_b = SafeImage(sources=["upload", "clipboard"], label="Image B (its invariances v)", height=220,
                                      format="png", elem_classes="input-image", elem_id="mix-b")
                    with gr.Column():
                        mix_convert = gr.Checkbox(value=is_digit, label="Convert to the model's domain",
                                                  info=convert_help, visible=is_digit)
                        run_mix = gr.Button("Mix", variant="primary", elem_id="run-mix")
                        mix_examples = PairExamples(pairs, "mix-examples")
                mix_check = gr.Markdown(elem_id="mix-check")
                mix_md = gr.Markdown()
                mix_img = ResultImage("Mixed decodes per layer", "mix-grid")

            # ---------------------------------------------------------------- Adversarial
            with gr.Tab("Adversarial", id="adversarial"):
                gr.Markdown("**FGSM** against the classifier, next to **random sign noise** of the same ε: what does each "
                            "layer see of the attacked image? (the paper's Fig. 5)")
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        adv_image = SafeImage(sources=["upload", "clipboard"], label="Image", height=220,
                                              format="png", elem_classes="input-image", elem_id="adv-image")
                        adv_convert = gr.Checkbox(value=is_digit, label="Convert to the model's domain",
                                                  info=convert_help, visible=is_digit)
                        eps = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="ε (on the [-1, 1] image scale)",
                                        info="small nets on 32 px digits need more than the paper's 0.02 (ResNet-101)")
                        adv_check = gr.Markdown(elem_id="adv-check")
                        adv_seed = gr.Number(0, precision=0, minimum=0, label="Noise seed")
                        run_adv = gr.Button("Attack", variant="primary", elem_id="run-attack")
                        adv_examples = gr.Dataset(components=[gr.Image(visible=False, format="png")], samples=ex,
                                                  type="index", label="Examples (click to run)",
                                                  samples_per_page=12, layout="gallery", elem_id="adv-examples")
                    with gr.Column(scale=3):
                        with gr.Row():
                            adv_orig = gr.Image(label="Original", format="png", height=140, interactive=False,
                                                elem_classes="pixelated", buttons=[])
                            adv_att = gr.Image(label="FGSM", format="png", height=140, interactive=False,
                                               elem_classes="pixelated", buttons=[])
                            adv_noise = gr.Image(label="Random signs", format="png", height=140, interactive=False,
                                                 elem_classes="pixelated", buttons=[])
                        with gr.Row():
                            lab_orig = gr.Label(num_top_classes=3, label="Before")
                            lab_att = gr.Label(num_top_classes=3, label="After FGSM")
                            lab_noise = gr.Label(num_top_classes=3, label="After noise")
                        adv_md = gr.Markdown(elem_id="adv-summary")
                        adv_img = ResultImage("What each layer sees", "adv-grid")
                        adv_extra = gr.Markdown(elem_id="adv-extra")
                        with gr.Row():
                            adv_v_clean = ResultImage("v samples with the clean z", "adv-v-clean")
                            adv_v_att = ResultImage("v samples with the FGSM z", "adv-v-attacked")

            # ---------------------------------------------------------------- Concepts
            with gr.Tab("Concepts", id="concepts"):
                concept_md = gr.Markdown(app.concept_intro(default), elem_id="concept-intro")
                switch_to = app.concept_switch(default)
                switch = gr.Button(f"Switch to {switch_to}" if switch_to else "", visible=switch_to is not None,
                                   size="sm", elem_id="concept-switch")
                gr.Markdown("### Transfer: give the target one concept of the source")
                with gr.Row():
                    c_target = SafeImage(sources=["upload", "clipboard"], label="Target", height=200, format="png",
                                         elem_classes="input-image", elem_id="concept-target")
                    c_source = SafeImage(sources=["upload", "clipboard"], label="Source (gives the concept)", height=200,
                                         format="png", elem_classes="input-image", elem_id="concept-source")
                    with gr.Column():
                        c_amount = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Amount",
                                             info="0 = the target as it is, 1 = the source's value of the concept")
                        run_transfer = gr.Button("Transfer concepts", variant="primary", elem_id="run-transfer")
                        c_pairs = PairExamples(pairs, "concept-examples")
                transfer_check = gr.Markdown(elem_id="transfer-check")
                transfer_md = gr.Markdown()
                transfer_img = ResultImage("Concept transfer", "transfer-grid")
                gr.Markdown("### Edit: move the image along each concept")
                slider_names = app.concept_sliders(default)
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        c_image = SafeImage(sources=["upload", "clipboard"], label="Image", height=200, format="png",
                                            elem_classes="input-image", elem_id="concept-image")
                        c_sliders = [gr.Slider(-3.0, 3.0, value=0.0, step=0.25,
                                               label=slider_names[i] if i < len(slider_names) else f"concept {i}",
                                               visible=i < len(slider_names), elem_id=f"concept-slider-{i}")
                                     for i in range(MAX_CONCEPT_SLIDERS)]
                        edit_check = gr.Markdown(elem_id="edit-check")
                        c_seed = gr.Number(0, precision=0, minimum=0, label="Direction seed",
                                           info="each concept moves along a seeded direction inside its factor")
                        run_edit = gr.Button("Edit", variant="primary", elem_id="run-edit")
                        c_examples = gr.Dataset(components=[gr.Image(visible=False, format="png")], samples=ex,
                                                type="index", label="Examples (click to run)", samples_per_page=12,
                                                layout="gallery", elem_id="concept-image-examples")
                    with gr.Column(scale=3):
                        edited = gr.Image(label="Edited", format="png", height=160, interactive=False,
                                          elem_classes="pixelated", buttons=[], elem_id="edited")
                        edit_md = gr.Markdown(elem_id="edit-summary")
                        walk_img = ResultImage("Each concept from -3 to +3", "walk-grid")
                with gr.Accordion("Which concepts does each layer encode?", open=False):
                    run_layers = gr.Button("Measure", elem_id="run-concept-layers")
                    layers_md = gr.Markdown(elem_id="concept-layers")

            video_tab(app, model, default, go)
            compare_tab(app, model, default, go)

            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT)

        # ------------------------------------------------------------------------ events
        tab_up.select(lambda: "upload", None, source, queue=False, api_visibility="private")
        tab_draw.select(lambda: "draw", None, source, queue=False, api_visibility="private")
        dice.click(lambda: random.randint(0, 2**31 - 1), None, seed, queue=False, api_visibility="private")

        interp_in = [model, source, image, sketch, convert, layer, n, temperature, seed]
        interp_out = [top, samples_img, summary, interp_extra]
        sweep_in = [model, source, image, sketch, convert, n, temperature, seed]
        sweep_out = [top, sweep_img, var_plot, agree_plot, sweep_md, sweep_extra]
        interpret_ui = image_files(ui_errors(app.interpret), samples_img.GRADIO_CACHE)
        run.click(interpret_ui, interp_in, interp_out, api_name="interpret", **go)
        sweep_ui = image_files(ui_errors(app.sweep), samples_img.GRADIO_CACHE)

        def sweep_and_open(*args):
            return (*sweep_ui(*args), gr.Accordion(open=True))

        run_sweep.click(sweep_and_open, sweep_in, sweep_out + [sweep_box], api_name="layer_sweep", **go)
        attack_in = [model, adv_image, adv_convert, eps, adv_seed]
        attack_out = [adv_orig, adv_att, adv_noise, lab_orig, lab_att, lab_noise, adv_img, adv_md, adv_v_clean, adv_v_att,
                      adv_extra]
        run_adv.click(image_files(ui_errors(app.attack), samples_img.GRADIO_CACHE), attack_in, attack_out,
                      api_name="adversarial", **go)
        run_mix.click(image_files(ui_errors(app.mix), samples_img.GRADIO_CACHE), [model, img_a, img_b, mix_convert],
                      [mix_img, mix_md], api_name="mix", **go)

        # what was done to each upload, and the out-of-domain warning, as soon as it arrives
        check = ui_errors(app.check_uploads)
        for comps, target in (([convert, image], interp_check), ([mix_convert, img_a, img_b], mix_check),
                              ([adv_convert, adv_image], adv_check)):
            for c in comps:
                c.change(check, [model] + comps, target, api_visibility="private", queue=False)
        no_convert = gr.State(False)
        for comps, target in (([c_target, c_source], transfer_check), ([c_image], edit_check)):
            for c in comps:
                c.change(check, [model, no_convert] + comps, target, api_visibility="private", queue=False)

        pick = ui_errors(app.example_image)
        (examples.click(lambda m, i: (pick(m, i), "upload", gr.Tabs(selected="upload")), [model, examples],
                        [image, source, input_tabs],
                        api_visibility="private", queue=False)
         .success(interpret_ui, interp_in, interp_out, api_visibility="private", **go))
        (adv_examples.click(pick, [model, adv_examples], adv_image, api_visibility="private", queue=False)
         .success(ui_errors(app.attack), attack_in, attack_out, api_visibility="private", **go))
        (mix_examples.click(lambda m, i: (pick(m, i, 0), pick(m, i, 1)), [model, mix_examples], [img_a, img_b],
                            api_visibility="private", queue=False)
         .success(ui_errors(app.mix), [model, img_a, img_b, mix_convert], [mix_img, mix_md], api_visibility="private", **go))

        transfer_in = [model, c_target, c_source, c_amount]
        run_transfer.click(ui_errors(app.transfer), transfer_in, [transfer_img, transfer_md], api_name="transfer", **go)
        (c_pairs.click(lambda m, i: (pick(m, i, 0), pick(m, i, 1)), [model, c_pairs], [c_target, c_source],
                       api_visibility="private", queue=False)
         .success(ui_errors(app.transfer), transfer_in, [transfer_img, transfer_md], api_visibility="private", **go))
        edit_in = [model, c_image, c_seed, *c_sliders]
        run_edit.click(ui_errors(app.edit), edit_in, [edited, walk_img, edit_md], api_name="edit", **go)
        (c_examples.click(pick, [model, c_examples], c_image, api_visibility="private", queue=False)
         .success(ui_errors(app.edit), edit_in, [edited, walk_img, edit_md], api_visibility="private", **go))
        run_layers.click(ui_errors(app.concept_layers), model, layers_md, api_name="concept_layers", **go)
        switch.click(lambda m: app.concept_switch(m) or m, model, model, api_visibility="private", queue=False)

        @ui_errors
        def select_model(name: str):
            """Load the chosen pipeline; update layers, examples and the domain switch."""
            e = registry.get(name)
            ex_, _ = app.examples(name)
            pairs_, _ = app.example_pairs(name)
            digit = e.domain == "digit"
            layers_ = e.pipe.layers  # type: ignore[union-attr]
            return (
                app.model_info(name),
                gr.Dropdown(choices=layers_, value=app.default_layer(name)),
                gr.Dataset(samples=ex_),
                gr.Dataset(samples=ex_),
                gr.Dataset(samples=pairs_),
                *(gr.Checkbox(value=digit, visible=digit) for _ in range(3)),
                gr.BarPlot(sort=layers_),
                gr.BarPlot(sort=layers_),
                app.concept_intro(name),
                gr.Button(value=f"Switch to {target}" if (target := app.concept_switch(name)) else "",
                          visible=target is not None),
                gr.Dataset(samples=pairs_),
                gr.Dataset(samples=ex_),
                "",
                *(gr.Slider(label=names[i] if i < len(names) else f"concept {i}", visible=i < len(names), value=0.0)
                  for names in [app.concept_sliders(name)] for i in range(MAX_CONCEPT_SLIDERS)),
            )

        model.change(select_model, model,
                     [info, layer, examples, adv_examples, mix_examples, convert, mix_convert, adv_convert,
                      var_plot, agree_plot, concept_md, switch, c_pairs, c_examples, layers_md, *c_sliders],
                     api_name="select_model", concurrency_id="load", concurrency_limit=1)
    demo.queue(max_size=256, default_concurrency_limit=max_concurrency)
    return demo


def video_tab(app: SpaceApp, model: gr.Dropdown, default: str, go: dict) -> None:
    """The Video tab (the official demo's video mode), built and wired inside ``build_demo``'s Tabs."""
    e = app.registry.get(default)
    digit = e.domain == "digit"
    with gr.Tab("Video", id="video"):
        gr.Markdown(f"Upload a short **video** (mp4, webm or gif; at most {space_video.MAX_SECONDS:g} s and "
                    f"{space_video.MAX_FRAMES} frames) and a **still image**. Each frame's invariances "
                    "v = t(E(frame) | Φ(frame)) are decoded with the still image's representation: D(t⁻¹(v | Φ(still))). "
                    "The result plays beside the frames as the model sees them.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                vid_file = gr.File(label="Video (mp4, webm, gif)", file_types=list(space_video.VIDEO_SUFFIXES),
                                   type="filepath", height=120, elem_id="video-file")
                vid_still = SafeImage(sources=["upload", "clipboard"], label="Still image (its representation z)",
                                      height=180, format="png", elem_classes="input-image", elem_id="video-still")
                with gr.Row():
                    vid_layer = gr.Dropdown(e.pipe.layers, value=app.default_layer(default), label="Layer",  # type: ignore[union-attr]
                                            min_width=120)
                    vid_fmt = gr.Radio(["mp4", "webm"], value="mp4", label="Output", info="H.264 mp4 or VP9 webm")
                vid_convert = gr.Checkbox(value=digit, label="Convert the still image to the model's domain",
                                          visible=digit)
                vid_convert_frames = gr.Checkbox(value=False, label="Convert every frame too",
                                                 info="centres each frame's digit MNIST-style (this removes the motion)",
                                                 visible=digit)
                with gr.Row():
                    run_video = gr.Button("Run on the video", variant="primary", elem_id="run-video")
                    vid_example = gr.Button("Example: a moving digit", elem_id="video-example")
            with gr.Column(scale=2):
                vid_out = gr.Video(label="Frame | the still's z with the frame's v", show_label=False, interactive=False,
                                   autoplay=True, loop=True, height=320, buttons=["download"], elem_id="video-result")
                vid_md = gr.Markdown(elem_id="video-summary")

    handler = ui_errors(app.video)

    def run(m, f, s, layer, convert, convert_frames, fmt, progress=gr.Progress()):
        return handler(m, f, s, layer, convert, convert_frames, fmt, progress=progress)

    inputs = [model, vid_file, vid_still, vid_layer, vid_convert, vid_convert_frames, vid_fmt]
    run_video.click(run, inputs, [vid_out, vid_md], api_name="video", **go)
    (vid_example.click(ui_errors(app.video_example), model, [vid_file, vid_still], api_visibility="private", **go)
     .success(run, inputs, [vid_out, vid_md], api_visibility="private", **go))

    @ui_errors
    def follow_model(name: str):
        digit_ = app.registry.get(name).domain == "digit"
        layers_ = app.registry.get(name).pipe.layers  # type: ignore[union-attr]
        return (gr.Dropdown(choices=layers_, value=app.default_layer(name)), gr.Checkbox(value=digit_, visible=digit_),
                gr.Checkbox(visible=digit_))

    model.change(follow_model, model, [vid_layer, vid_convert, vid_convert_frames], api_visibility="private",
                 concurrency_id="load", concurrency_limit=1)

def compare_tab(app: SpaceApp, model: gr.Dropdown, default: str, go: dict) -> None:
    """The Compare tab (one image, two pipelines that share an autoencoder, the same v), built and wired inside
    ``build_demo``'s Tabs."""
    e = app.registry.get(default)
    digit = e.domain == "digit"
    choices, note = app.compare_partners(default)
    b0 = choices[0][1] if choices else None
    layers_b, layer_b0 = app.compare_layers(b0, app.default_layer(default))
    with gr.Tab("Compare", id="compare"):
        gr.Markdown("**Two networks, one image, the same v.** Pipelines that share an autoencoder can decode the same "
                    "invariance samples v with each network's representation z: D(t_A⁻¹(v | z_A)) beside "
                    "D(t_B⁻¹(v | z_B)). The first model is the one chosen above.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                cmp_image = SafeImage(sources=["upload", "clipboard"], label="Image", height=200, format="png",
                                      elem_classes="input-image", elem_id="compare-image")
                cmp_convert = gr.Checkbox(value=digit, label="Convert to the model's domain", visible=digit)
                cmp_check = gr.Markdown(elem_id="compare-check")
                cmp_layer_a = gr.Dropdown(e.pipe.layers, value=app.default_layer(default),  # type: ignore[union-attr]
                                          label="Layer of the first model", elem_id="compare-layer-a")
                cmp_model_b = gr.Dropdown(choices, value=b0, label="Second model (shares the autoencoder)",
                                          elem_id="compare-model-b")
                cmp_note = gr.Markdown(note, elem_id="compare-note")
                cmp_layer_b = gr.Dropdown(layers_b, value=layer_b0, label="Layer of the second model",
                                          elem_id="compare-layer-b")
                with gr.Row():
                    cmp_n = gr.Slider(1, space.MAX_SAMPLES, value=16, step=1, label="Samples N")
                    cmp_t = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Temperature of v")
                cmp_seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="compare-seed")
                run_cmp = gr.Button("Compare", variant="primary", elem_id="run-compare")
            with gr.Column(scale=3):
                cmp_md = gr.Markdown(elem_id="compare-summary")
                with gr.Row():
                    cmp_a = ResultImage("First model: its z with the shared v", "compare-a")
                    cmp_b = ResultImage("Second model: its z with the shared v", "compare-b")

    inputs = [model, cmp_model_b, cmp_image, cmp_convert, cmp_layer_a, cmp_layer_b, cmp_n, cmp_t, cmp_seed]
    run_cmp.click(image_files(ui_errors(app.compare), cmp_a.GRADIO_CACHE), inputs, [cmp_a, cmp_b, cmp_md],
                  api_name="compare", **go)
    check = ui_errors(app.check_uploads)
    for c in (cmp_convert, cmp_image):
        c.change(check, [model, cmp_convert, cmp_image], cmp_check, api_visibility="private", queue=False)

    @ui_errors
    def follow_model(name: str):
        digit_ = app.registry.get(name).domain == "digit"
        layers_ = app.registry.get(name).pipe.layers  # type: ignore[union-attr]
        choices_, note_ = app.compare_partners(name)
        b = choices_[0][1] if choices_ else None
        lb, vb = app.compare_layers(b, app.default_layer(name))
        return (gr.Dropdown(choices=layers_, value=app.default_layer(name)), gr.Dropdown(choices=choices_, value=b),
                note_, gr.Dropdown(choices=lb, value=vb), gr.Checkbox(value=digit_, visible=digit_))

    model.change(follow_model, model, [cmp_layer_a, cmp_model_b, cmp_note, cmp_layer_b, cmp_convert],
                 api_visibility="private", concurrency_id="load", concurrency_limit=1)

    @ui_errors
    def follow_model_b(name: str | None, layer_a: str | None):
        lb, vb = app.compare_layers(name, layer_a)
        return gr.Dropdown(choices=lb, value=vb)

    cmp_model_b.change(follow_model_b, [cmp_model_b, cmp_layer_a], cmp_layer_b, api_visibility="private",
                       concurrency_id="load", concurrency_limit=1)


ABOUT = """
### How to read the views
* **Interpret**: N samples D(t⁻¹(v | z)) for one layer. The samples share the layer's representation z of your image
  and differ only in the invariances v. Temperature scales v (0 gives the reconstruction of the mean invariance).
* **Layer sweep**: the same v samples decoded with each layer's z. Shallow layers keep the image; deep layers keep the
  class and let style, thickness, slant vary. The bar charts show the share of the autoencoder code's variance that v
  explains, and how many samples the classifier still puts into the input's class.
* **Mix**: A's representation with B's invariances. Early layers show A; late layers show B's style with A's class.
* **Adversarial**: FGSM (cross-entropy w.r.t. the predicted class, one signed gradient step of size ε, clamped to [-1, 1])
  and a random-sign control of the same ε. Each layer's view decodes the layer's representation of the perturbed image
  with the original image's invariances.
* **Concepts** (pipelines with a concept INN e, e.g. the embedded colormnist): e splits the autoencoder code into
  semantic factors (for ColorMNIST: digit, foreground colour, background colour, residual), learned from pairs of
  images that share one concept. *Transfer* swaps one factor between two images; *Edit* moves along a factor.
* **Compare**: one image, two pipelines that share an autoencoder: the same v samples decoded with each network's
  representation, D(t_A⁻¹(v | z_A)) beside D(t_B⁻¹(v | z_B)) (the official demo's texture-bias mode, which compared an
  ImageNet and a Stylized-ImageNet ResNet-50). The second model menu lists only models on the same autoencoder.
* **Video**: each frame's invariances v = t(E(frame) | Φ(frame)) decoded with a still image's representation,
  D(t⁻¹(v | Φ(still))), beside the frames (the official demo's video mode): the still's content moving as the video does,
  as far as the layer is invariant to that motion.

Everything runs on your machine's CPU; the embedded pipeline needs no network. Code: invint_hub (`python app.py --help`).
"""


def launch_options() -> dict:
    """Keyword arguments for ``demo.launch`` (Gradio 6 takes theme and css there)."""
    return dict(ssr_mode=False, theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, show_error=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=TITLE)
    ap.add_argument("--model", action="append", default=[], metavar="REPO_OR_DIR",
                    help="a Hub repo id or local pipeline folder to offer (repeatable); also INVINT_MODELS=a,b")
    ap.add_argument("--no-embedded", action="store_true", help="do not offer the embedded pipelines")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", 7860))))
    ap.add_argument("--concurrency", type=int, default=4, help="requests computed at once over all models")
    ap.add_argument("--per-model", type=int, default=2, help="requests one model computes at once")
    ap.add_argument("--examples", type=int, default=10, help="example images per model")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("INVINT_TORCH_THREADS", 1)),
                    help="torch threads per request (default 1: requests run in parallel instead; more threads "
                         "on a shared 2-core CPU make every request many times slower)")
    return ap.parse_args(argv)


def models_from(args: argparse.Namespace) -> list[str]:
    env = os.environ.get("INVINT_MODELS", "")
    return [m.strip() for m in args.model + env.replace(";", ",").split(",") if m.strip()]


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    models = models_from(args)
    try:
        registry = space.ModelRegistry(models, include_embedded=not args.no_embedded, per_model_limit=args.per_model,
                                       examples_per_model=args.examples)
        if models:  # an explicitly named model comes first
            registry.names.remove(models[0])
            registry.names.insert(0, models[0])
        demo = build_demo(registry, max_concurrency=args.concurrency)
    except ValueError as e:
        sys.exit(f"app.py: {space.one_line(e)}")
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())


if __name__ == "__main__":
    main()
