"""Video mode (the Space's Video tab) in process: the example clip, 300 frames at 112 px and at 640x480.

    python eval/bench_video.py            # one torch thread, embedded MNIST pipeline, layer fc
"""
import time, tempfile, pathlib, statistics, numpy as np, torch
torch.set_num_threads(1)
from PIL import Image
from invint_hub import InvariancePipeline
from invint_hub.space import video as V, registry
pipe = InvariancePipeline.from_pretrained()
d = pathlib.Path(tempfile.mkdtemp())
paths, _ = registry.build_examples(pipe, d/"ex", 10)
still = pipe.preprocess(str(paths[8]))
V.make_example_video(paths[3], d/"ex.mp4")
# 300 frames, 10 s at 30 fps, 640x480: the example digit moving, upscaled
clip = V.read_video(d/"ex.mp4")
big = [np.asarray(clip.frames[i % 24].resize((480, 480)).crop((0,0,480,480))) for i in range(300)]
big = [np.pad(f, ((0,0),(80,80),(0,0))) for f in big]
V.encode_video(big, d/"big.mp4", 30)
small = [np.asarray(clip.frames[i % 24]) for i in range(300)]
V.encode_video(small, d/"small.mp4", 30)
for name in ["ex.mp4", "small.mp4", "big.mp4"]:
    ts=[]
    for r in range(3):
        t=time.perf_counter(); out, m, c = V.video_invariances(pipe, d/name, still, "fc", path=d/f"o_{r}.mp4"); ts.append(time.perf_counter()-t)
    t=time.perf_counter(); c = V.read_video(d/name); td=time.perf_counter()-t
    print(f"{name}: {len(c.frames)} frames {c.width}x{c.height} @ {c.fps:g} fps: whole video mode median {statistics.median(ts):.2f} s of {['%.2f'%x for x in ts]}; decode alone {td:.2f} s")
