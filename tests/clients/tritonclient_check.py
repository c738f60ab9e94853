"""The Open Inference Protocol routes, driven by NVIDIA's own REST client (tritonclient[http]) against a live
server: health, metadata, readiness, inference with BYTES (binary and base64 JSON) and FP32 inputs, the
classification extension, version numbers and aliases, tokens, and the protocol's error shape.

    python tests/clients/tritonclient_check.py --url 127.0.0.1:8080 --model efficientnet-lite0 \
        --photo data/foolbox/imagenet_00_243.jpg --label 243 --pixels pixels.f32 [--token SECRET]

`--pixels` is the photo preprocessed by the server's own rules (3 x H x W little-endian float32), so that
both inputs must give the same probabilities. Exits non-zero at the first failed check."""
import base64
import json
import urllib.error
import urllib.request

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from client_checks import arguments, check


def main():
    a = arguments(__doc__)
    token = {"Authorization": f"Bearer {a.token}"} if a.token else {}
    # A fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one it is given.
    auth = lambda: dict(token)
    client = http.InferenceServerClient(url=a.url)

    check(client.is_server_live(), "is_server_live")
    check(client.is_server_ready(), "is_server_ready")
    check("classification" in client.get_server_metadata(headers=auth())["extensions"], "server metadata")
    check(client.is_model_ready(a.model, headers=auth()), "is_model_ready (default version)")
    check(client.is_model_ready(a.model, "0", headers=auth()), "is_model_ready version 0")
    check(not client.is_model_ready(a.model, "999999", headers=auth()), "an unknown version is not ready")
    metadata = client.get_model_metadata(a.model, headers=auth())
    names = {t["name"]: t for t in metadata["inputs"]}
    check(set(names) == {"images", "pixels"} and metadata["outputs"][0]["name"] == "probabilities", "model metadata")
    shape = names["pixels"]["shape"][1:]
    classes = metadata["outputs"][0]["shape"][1]

    photo = open(a.photo, "rb").read()
    images = np.array([photo, photo], dtype=np.object_)

    def infer_bytes(binary_in, version="", outputs=None):
        inp = http.InferInput("images", [2], "BYTES")
        inp.set_data_from_numpy(images if binary_in else
                                np.array([base64.b64encode(photo)] * 2, dtype=np.object_), binary_data=binary_in)
        return client.infer(a.model, [inp], model_version=version, outputs=outputs, headers=auth())

    binary = infer_bytes(True).as_numpy("probabilities")
    check(binary.shape == (2, classes) and binary.dtype == np.float32, "infer BYTES, binary data in and out")
    check(abs(float(binary[0].sum()) - 1) < 1e-3 and int(binary[0].argmax()) == a.label, "probabilities, top-1 right")
    as_json = infer_bytes(False, outputs=[http.InferRequestedOutput("probabilities", binary_data=False)])
    check(np.allclose(as_json.as_numpy("probabilities"), binary, atol=1e-6), "infer BYTES as base64 JSON, JSON out")
    check(np.allclose(infer_bytes(True, version="0").as_numpy("probabilities"), binary, atol=1e-6),
          "infer with version 0")
    check(np.allclose(infer_bytes(True, version="base").as_numpy("probabilities"), binary, atol=1e-6),
          "infer with the alias 'base'")

    for out_binary in (True, False):
        top = infer_bytes(True, outputs=[http.InferRequestedOutput("probabilities", binary_data=out_binary,
                                                                    class_count=3)]).as_numpy("probabilities")
        first = top[0][0].decode() if isinstance(top[0][0], bytes) else top[0][0]
        score, index, label = first.split(":", 2)
        check(top.shape == (2, 3) and int(index) == a.label and abs(float(score) - binary[0].max()) < 1e-5 and label,
              f"classification extension, class_count 3 ({'binary' if out_binary else 'JSON'}): {first}")

    pixels = np.fromfile(a.pixels, dtype="<f4").reshape([1] + shape)
    inp = http.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    fp32 = client.infer(a.model, [inp], headers=auth()).as_numpy("probabilities")
    check(np.allclose(fp32[0], binary[0], atol=1e-4), "infer FP32 [1,3,H,W] = the same image as BYTES")
    inp.set_data_from_numpy(pixels, binary_data=False)
    fp32 = client.infer(a.model, [inp], headers=auth()).as_numpy("probabilities")
    check(np.allclose(fp32[0], binary[0], atol=1e-4), "infer FP32 as JSON numbers")

    try:
        bad = http.InferInput("pixels", [1, 3, 8, 8], "FP32")
        bad.set_data_from_numpy(np.zeros([1, 3, 8, 8], dtype=np.float32))
        client.infer(a.model, [bad], headers=auth())
        check(False, "a tensor of the wrong size is refused")
    except InferenceServerException as e:
        check(e.status() == "422" and "3 x" in e.message(), f"a tensor of the wrong size is refused: {e.message()}")
    try:
        client.get_model_metadata("no-such-model", headers=auth())
        check(False, "an unknown model is refused")
    except InferenceServerException as e:
        check(e.status() == "404" and "no-such-model" in e.message(), "an unknown model: 404 with a message")

    if a.token:
        try:
            http.InferenceServerClient(url=a.url).get_model_metadata(a.model)
            check(False, "no token is refused")
        except InferenceServerException as e:
            check(e.status() == "401", "metadata without a token: 401")
        request = urllib.request.Request(f"http://{a.url}/v2/models/{a.model}/infer", method="POST", data=b"{}",
                                         headers={"Authorization": "Bearer wrong"})
        try:
            urllib.request.urlopen(request)
            check(False, "an unknown token is refused")
        except urllib.error.HTTPError as e:
            check(e.code == 401 and json.loads(e.read())["error"], "infer with an unknown token: 401")
    print("all tritonclient checks passed")


if __name__ == "__main__":
    main()
