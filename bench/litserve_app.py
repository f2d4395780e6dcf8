"""LitServe wrapping the CryoLens engine, for bench/http.py: what a user would otherwise build.

Run: python bench/litserve_app.py --port 8100 [--checkpoint demo] [--device cpu]
POST /predict with a multipart field ``file`` holding one particle as .npy; answers the
embedding as JSON. Dynamic batching on: max_batch_size 32, batch_timeout 10 ms.
"""
from __future__ import annotations

import argparse
import io

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import litserve as ls
import numpy as np


class FeaturesAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, device: str) -> None:
        super().__init__(max_batch_size=32, batch_timeout=0.01)
        self.checkpoint, self.engine_device = checkpoint, device

    def setup(self, device) -> None:
        from cryolens import heap
        from cryolens.engine import Engine
        from cryolens.operations import Operation

        heap.tune()  # in LitServe's worker process, as our server does in its own
        self.engine = Engine.from_checkpoint(self.checkpoint, device=self.engine_device)
        self.operation = Operation("features")

    def decode_request(self, request):
        return np.load(io.BytesIO(request["file"].file.read()), allow_pickle=False)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, volumes):
        from cryolens.operations import run

        return run(self.engine, self.operation, volumes).arrays["embedding"]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, embedding):
        return {"embedding": embedding.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    server = ls.LitServer(FeaturesAPI(args.checkpoint, args.device), accelerator="cpu",
                          devices=1, workers_per_device=1, timeout=60)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False)


if __name__ == "__main__":
    main()
