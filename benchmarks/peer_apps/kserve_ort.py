"""KServe's Python ModelServer with a custom Model wrapping onnxruntime (KServe's "custom model"
guide: load() in the constructor, predict() on an InferRequest, an InferResponse back).

Binary tensors (KServe's binary tensor data extension) as KServe's own model servers answer them
(``kserve.utils.utils.get_predict_response``): the request's inputs arrive decoded by the
ModelServer (``Inference-Header-Content-Length``), and the outputs are written as binary when the
request asks for it (``binary_data_output``), JSON otherwise.

``python kserve_ort.py PORT NAME=MODEL.onnx ...`` (run with the peer's own environment).
"""

import sys

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import generate_uuid

DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


class OnnxModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.sess = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.outs = [o.name for o in self.sess.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feed = {i.name: i.as_numpy() for i in payload.inputs}
        res = self.sess.run(self.outs, feed)
        outputs = []
        for n, r in zip(self.outs, res, strict=True):
            out = InferOutput(name=n, shape=list(r.shape), datatype=DATATYPES.get(str(r.dtype), "BYTES"))
            out.set_data_from_numpy(r, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or generate_uuid(),
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


if __name__ == "__main__":
    models = [OnnxModel(*spec.split("=", 1)) for spec in sys.argv[2:]]
    ModelServer(http_port=int(sys.argv[1]), enable_grpc=False).start(models)
