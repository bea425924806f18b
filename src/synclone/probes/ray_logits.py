"""Clean-data logits on a Ray cluster (``executor.kind: ray``), landing in the same logits cache.

:meth:`synclone.probes.base.EvalContext.logits` calls :func:`logits_on_ray` instead of its local loop
when the evaluate config says ``executor.kind: ray``. The set is cut into the batches the local loop uses
(``batch_size`` images from the start); each batch is one row of a Ray Dataset:

* a set read from files (:class:`synclone.data.streaming.FileImageSet`, ImageNet-sized folders) ships
  only the file paths: :class:`LogitsWorker` decodes and preprocesses them on the worker, as the local
  streaming loop does;
* an in-memory set (Fashion-MNIST) is put into Ray's object store once and each worker slices its batches.

One actor per worker loads the model folder once (``synclone.load_model``) and returns each batch's
logits; the driver puts them back in order and the cache entry is written under the same key as a local
run. With the same batches and the same torch thread count the logits equal the local ones bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from synclone.util.executor import ExecutorConfig, absolute, node_name, one_line_errors, ray_session, worker_threads


class LogitsWorker:
    """A Ray actor: one model per worker; each call returns the logits of one batch."""

    def __init__(self, model: str, cpus: float, device: str, images=None, size=None, preprocess=None,
                 batch_size: int = 256):
        from synclone.errors import UserError
        from synclone.models import load_model

        torch.set_num_threads(worker_threads(cpus))
        try:
            self.module = load_model(model, device=device)
        except Exception as err:  # noqa: BLE001 - reported as one line naming the node
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"Ray worker on node {node_name()} cannot load the model '{model}': {first}; make the "
                            f"model folder available on every node") from None
        self.device = torch.device(device)
        if images is not None and not isinstance(images, np.ndarray):  # an object reference Ray passed on as is
            import ray

            images = ray.get(images)
        self.images = images  # an in-memory set (numpy, from the object store), or None for files
        self.size, self.preprocess, self.batch_size = size, preprocess, batch_size

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        i = int(batch["batch"][0])
        if self.images is not None:
            x = torch.from_numpy(np.asarray(self.images[i * self.batch_size:(i + 1) * self.batch_size]))
        else:
            x = torch.stack([self.preprocess(p, self.size) for p in json.loads(batch["paths"][0])])
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        out = self.module(x.to(self.device)).float().cpu().numpy()
        return {"batch": np.asarray([i]), "logits": out[None]}


def logits_on_ray(model_folder, model_size, data, batch_size: int, executor: ExecutorConfig,
                  progress: bool = False, desc: str = "logits") -> torch.Tensor:
    """Logits of the model in ``model_folder`` on ``data`` (float32, in data order), computed by Ray workers."""
    n = len(data)
    if n == 0:
        return torch.empty(0)
    n_batches = -(-n // batch_size)
    streaming = hasattr(data, "iter_batches")
    kwargs: dict = {"model": absolute(model_folder), "cpus": executor.cpus_per_worker, "batch_size": batch_size}
    if streaming:
        paths = [absolute(p) for p in data.paths]
        rows = [{"batch": b, "paths": json.dumps(paths[b * batch_size:(b + 1) * batch_size])}
                for b in range(n_batches)]
        kwargs.update(size=data.resolve_size(model_size), preprocess=data.preprocess)
    else:
        rows = [{"batch": b} for b in range(n_batches)]
    parts: dict[int, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{desc} [ray x{executor.workers}]", unit="img", leave=False)
    with ray_session(executor) as session, one_line_errors("evaluate"):
        import ray
        import ray.data

        if not streaming:
            images = data.images
            kwargs["images"] = ray.put(images.numpy())  # once into the object store, sliced by every worker
        kwargs["device"] = session.device()
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * executor.workers))
        ds = ds.map_batches(LogitsWorker, batch_size=1, fn_constructor_kwargs=kwargs, **session.map_args())
        for out in ds.iter_rows():
            b = int(out["batch"])
            parts[b] = np.asarray(out["logits"])
            if bar is not None:
                bar.update(len(parts[b]))
    if bar is not None:
        bar.close()
    return torch.from_numpy(np.concatenate([parts[b] for b in range(n_batches)]))
