"""A FastAPI/uvicorn app calling onnxruntime: KServe v2 JSON infer, the way its users write one.

``python fastapi_ort.py PORT NAME=MODEL.onnx ...`` (run with the peer's own environment).
"""

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

app = FastAPI()
sessions: dict = {}
DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    inputs: list[Tensor]


@app.get("/v2/health/ready")
def ready() -> dict:
    return {"ready": True}


@app.get("/v2/models/{name}/ready")
def model_ready(name: str) -> dict:
    if name not in sessions:
        raise HTTPException(404, f"unknown model {name}")
    return {"name": name, "ready": True}


@app.post("/v2/models/{name}/infer")
def infer(name: str, req: InferRequest) -> dict:
    if name not in sessions:
        raise HTTPException(404, f"unknown model {name}")
    sess, outs = sessions[name]
    feed = {t.name: np.asarray(t.data, dtype=np.float32).reshape(t.shape) for t in req.inputs}
    res = sess.run(outs, feed)
    return {"model_name": name, "outputs": [
        {"name": n, "shape": list(r.shape), "datatype": DATATYPES.get(str(r.dtype), "BYTES"), "data": r.ravel().tolist()}
        for n, r in zip(outs, res, strict=True)]}


if __name__ == "__main__":
    for spec in sys.argv[2:]:
        name, path = spec.split("=", 1)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        sessions[name] = (sess, [o.name for o in sess.get_outputs()])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
