"""Quickstart on the bundled zoo: one-shot merges, then the accuracy-size axis.

Run: python examples/quickstart.py
"""

import numpy as np

import flexmerge_jax as fm
from flexmerge_jax import zoo

z = zoo.load()  # a small ViT: base + 8 fine-tuned backbones (real tasks)
print(f"{z.num_tasks} tasks: {', '.join(z.task_names)}")
print(f"fine-tuned (8x) accuracy {np.mean(z.ft_accuracy):.3f}")

# One-shot merges (1x).
for method in [fm.methods.average(), fm.methods.ties(scale=1.0, keep=0.2)]:
    merged = fm.merge(z.base, z.finetuned, method, blocks="vit")
    acc = np.mean(z.evaluate_all(merged))
    print(f"merge {method.describe():28s} 1x  accuracy {acc:.3f}")

# FlexMerge: one plan gives every size from 8x down to 1x.
plan = fm.plan(z.base, z.finetuned, blocks="vit", method=fm.methods.ties(keep=0.2),
               task_names=z.task_names)
for size in [1.0, 1.5, 2.0, 4.0]:
    model = plan.at_size(size)
    acc = np.mean(z.evaluate_all([model.params_for_task(i) for i in range(z.num_tasks)]))
    print(f"plan  ties  {model.n_models:5.2f}x  accuracy {acc:.3f}")
