"""The helpers of the Gradio Space (``app.py``), free of UI code so they can be tested alone.

* ``inputs``: uploads decoded once and safely, photos and sketches -> a pipeline's input domain, setting limits;
* ``registry``: the pipelines the Space offers, loaded on demand, with concurrency slots and example images;
* ``render``: labelled image grids (one image file per result).

The computations are the pipeline's batched views (``InvariancePipeline.interpret``, ``layer_sweep``,
``mix_layers``, ``attack``, ``compare``) and the concept views of ``invint_hub.concepts``; the Space only formats them.
"""
from .inputs import (
    DOMAINS,
    MAX_SAMPLES,
    center_digit,
    check_sampling,
    input_domain,
    load_image,
    one_line,
    prepare_input,
    sketch_to_image,
    stroke_mask,
    to_model_domain,
    upload_notices,
)
from .registry import ModelEntry, ModelRegistry, build_examples, generated_examples
from .render import class_name, compare_grid, compose_grid, interpret_grid, png_file, sample_grid, sweep_grid, tensor_images, upscale

__all__ = [
    "DOMAINS", "MAX_SAMPLES", "center_digit", "check_sampling", "input_domain", "load_image", "one_line",
    "prepare_input", "sketch_to_image", "stroke_mask", "to_model_domain", "upload_notices", "ModelEntry", "ModelRegistry",
    "build_examples", "generated_examples", "class_name", "compare_grid", "compose_grid", "interpret_grid", "png_file", "sample_grid",
    "sweep_grid", "tensor_images", "upscale",
]
