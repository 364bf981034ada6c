"""Every torchvision classification model as a Backbone (random weights, 32 px images): default layers, one pass
equals the logits, and a cINN on the first layer of each representation kind.

    python eval/check_torchvision_models.py              # all of torchvision.models.list_models(module=torchvision.models)
    python eval/check_torchvision_models.py resnet18 vit_b_16
"""
import sys, time, traceback, gc
import torch, torchvision
from invint_hub import Backbone, ConditionalINN
torch.set_num_threads(1)
names = sys.argv[1:] or torchvision.models.list_models(module=torchvision.models)
ok, bad = [], []
for name in names:
    t0 = time.time()
    try:
        with torch.no_grad():
            b = Backbone.from_torchvision(name, image_size=32)
            x = torch.rand(1, 3, 32, 32) * 2 - 1
            feats = b.forward_layers(x, b.layers)
            assert torch.allclose(feats[b.logits_layer], b(x), atol=1e-5)
            kinds = {}
            for l in b.layers:
                kinds.setdefault(len(b.feature_shapes[l]), l)
            for l in kinds.values():
                ConditionalINN(latent_dim=8, cond_shape=list(b.feature_shapes[l]), embed_dim=8, n_flows=1, hidden=8,
                               depth=1, embedder_depth=2, embedder_width=4)(torch.randn(1, 8), feats[l])
        ok.append(name)
        print(f"ok   {name:24s} {time.time()-t0:5.1f}s {len(b.layers)} layers {sorted(kinds)}", flush=True)
    except Exception as e:
        bad.append((name, repr(e)[:200]))
        print(f"FAIL {name:24s} {repr(e)[:200]}", flush=True)
    del b
    gc.collect()
print(f"{len(ok)} of {len(names)} torchvision classification models work; failures: {bad}")
