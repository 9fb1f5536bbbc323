"""The two halves of a deployment as loaded modules: :class:`ClientHalf` (encoder + deployed
defense transforms, from ``client.safetensors``) and :class:`ServerHalf` (tail + classifier,
from ``server.safetensors``).

This module sits at the bottom of :mod:`splitcem.serving` (beside :mod:`~splitcem.serving.wire`
and :mod:`~splitcem.serving.deploy`): the export checks its output with both halves, the
client runs one and the server the other, and neither of those imports the other.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from splitcem.errors import ServingError
from splitcem.serving.deploy import read_half
from splitcem.serving.program import ONNX_FILE, build_half
from splitcem.serving.wire import WireError

__all__ = ["ClientHalf", "OnnxClientHalf", "ServerHalf"]


class ClientHalf:
    """The client encoder and deployed defense transforms of a deployment.

    Reads ``spec.json`` and ``client.safetensors`` only. ``encode(x01)`` is exactly what a
    client sends for images in [0, 1]: normalise, encoder, then the defense transforms in
    eval mode (noise is fresh on every call; it draws from torch's global generator).
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu") -> None:
        from splitcem.defenses import DefenseStack, create_defense
        spec, tensors = read_half(path, "client")
        self.spec = spec
        self.device = torch.device(device)
        enc: nn.Module = build_half(path, spec, "client")  # a program, or rebuilt
        self._load(enc, tensors, "client.")
        defenses = []
        for i, s in enumerate(spec["defense"]["transforms"]):
            d = create_defense(s["name"], **{k: v for k, v in s.items() if k != "name"})
            self._load(d, tensors, f"defense.{i}.")
            defenses.append(d)
        self.encoder = enc.to(self.device).eval()
        self.defenses = DefenseStack(defenses).to(self.device).eval()
        img = spec["image"]
        self.channels, self.size = int(img["channels"]), int(img["size"])
        self._mean = torch.tensor(img["mean"], device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(img["std"], device=self.device).view(1, -1, 1, 1)

    @staticmethod
    def _load(module: nn.Module, tensors: dict[str, Tensor], prefix: str) -> None:
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ServingError(f"client weights ({prefix}*) do not fit the spec ({e}); "
                               "re-export: splitcem export RUN_DIR") from e

    def normalize(self, x01: Tensor) -> Tensor:
        """Images in [0, 1] -> the encoder's input scale."""
        return (x01.to(self.device) - self._mean) / self._std

    @torch.no_grad()
    def encode(self, x01: Tensor, *, defense: bool = True) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, Cz, Hz, Wz) features to send (float32, CPU).

        ``defense=False`` gives the clean encoder output (for tests and audits only: a
        client that sends it drops the run's protection).
        """
        z = self.encoder(self.normalize(x01)).float()
        if defense:
            z = self.defenses.transform(z)
        return z.cpu()


class ServerHalf:
    """The server tail and classifier of a deployment, loaded from its server file only.

    Args:
        path: A deployment directory (or a run directory holding ``deploy/``).
        device: Where the tail runs.

    The architecture is rebuilt from the spec; only the ``server`` sub-module is kept (the
    freshly initialised client layers of the rebuild are dropped at once, and the
    deployment's client weights are never read).
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu") -> None:
        spec, tensors = read_half(path, "server")
        self.spec = spec
        self.device = torch.device(device)
        tail: nn.Module = build_half(path, spec, "server")  # a program, or rebuilt
        state = {k[len("server."):]: v for k, v in tensors.items()}
        try:
            tail.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ServingError(f"server weights do not fit the spec's model ({e}); re-export"
                               ) from e
        self.tail = tail.to(self.device).eval()
        #: tensor names loaded (all "server.*"), for audits
        self.loaded_keys = sorted(tensors)
        self.model_id: str = spec["model_id"]
        self.classes: list[str] = list(spec["classes"])
        self.feature_shape: tuple[int, int, int] = tuple(spec["features"]["shape"])  # type: ignore[assignment]
        self._lock = threading.Lock()

    @torch.inference_mode()
    def logits(self, z: Tensor) -> Tensor:
        """(B, C, H, W) features -> (B, K) float32 logits on the CPU."""
        with self._lock:  # one forward at a time: each gets all intra-op threads
            return self.tail(z.to(self.device, torch.float32)).float().cpu()

    def predict(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (B, C, H, W) features -> (probabilities (B, K) float64, labels (B,))."""
        return self.answer(self.logits(torch.from_numpy(z)))

    @staticmethod
    def answer(logits: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One request's (B, K) logits -> (probabilities float64, labels); 422 if not finite.

        Split out of :meth:`predict` so that a batched forward pass (several requests in
        one) answers each request on its own rows.
        """
        logits = logits.double()
        if not torch.isfinite(logits).all():
            raise WireError(422, "out_of_range",
                            "these features drive the model's logits to infinity; expected "
                            "the client encoder's outputs (after its defense transform)")
        probs = torch.softmax(logits, dim=1)
        return probs.numpy(), probs.argmax(dim=1).numpy()


class OnnxClientHalf:
    """The client half run by onnxruntime on the CPU from ``client.onnx`` (no torch model):
    the same ``encode`` as :class:`~splitcem.serving.ClientHalf`."""

    def __init__(self, path: str | Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ServingError("the edge client needs onnxruntime: pip install "
                               "'splitcem[edge]'") from e
        from splitcem.serving.deploy import find_deploy_dir, read_spec, sha256_bytes

        d = find_deploy_dir(path)
        self.spec = read_spec(d)
        entry = self.spec.get("files", {}).get("client_onnx")
        if entry is None:
            raise ServingError(f"{d} has no {ONNX_FILE}; write it with splitcem export "
                               f"{path} --onnx")
        data = (d / entry["path"]).read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
            raise ServingError(f"{d / entry['path']} does not match spec.json; re-export")
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        img = self.spec["image"]
        self.channels, self.size = int(img["channels"]), int(img["size"])
        self.sigma = float(self.spec["defense"]["noise_sigma"])

    def encode(self, x01: Tensor, *, defense: bool = True) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> the features to send (noise on unless told)."""
        x = x01.detach().cpu().float().numpy()
        sigma = np.float32(self.sigma if defense else 0.0)
        out = self.session.run(None, {"images": x, "noise_sigma": np.asarray(sigma)})[0]
        return torch.from_numpy(np.ascontiguousarray(out))
