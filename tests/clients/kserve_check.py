"""The Open Inference Protocol routes, driven by the KServe Python SDK's REST client (`kserve`'s
InferenceRESTClient, protocol v2) against a live server: liveness, readiness, model readiness, and inference
with BYTES (base64 JSON) and FP32 inputs, and a request without the token refused.

    python tests/clients/kserve_check.py --url http://127.0.0.1:8080 --model efficientnet-lite0 \
        --photo data/foolbox/imagenet_00_243.jpg --label 243 --pixels pixels.f32 --token SECRET

Exits non-zero at the first failed check."""
import asyncio
import base64

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from client_checks import arguments, check


async def main():
    a = arguments(__doc__)
    auth = {"Authorization": f"Bearer {a.token}"} if a.token else {}
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=120))
    try:
        check(await client.is_server_live(a.url), "is_server_live")
        check(await client.is_server_ready(a.url), "is_server_ready")
        check(await client.is_model_ready(a.url, a.model, headers=auth), "is_model_ready")
        check(not await client.is_model_ready(a.url, "no-such-model", headers=auth), "an unknown model is not ready")

        photo = base64.b64encode(open(a.photo, "rb").read()).decode()
        images = InferInput("images", [2], "BYTES", [photo, photo])
        response = await client.infer(a.url, InferRequest(a.model, [images], request_id="k1"), a.model,
                                      headers=dict(auth))
        probabilities = response.outputs[0].as_numpy()
        check(response.id == "k1" and response.outputs[0].name == "probabilities", "infer BYTES: the response")
        check(probabilities.shape[0] == 2 and int(probabilities[0].argmax()) == a.label, "infer BYTES: top-1 right")

        pixels = np.fromfile(a.pixels, dtype="<f4")
        side = int(round((pixels.size / 3) ** 0.5))
        tensor = InferInput("pixels", [1, 3, side, side], "FP32")
        tensor.set_data_from_numpy(pixels.reshape(1, 3, side, side), binary_data=False)
        fp32 = await client.infer(a.url, InferRequest(a.model, [tensor]), a.model, headers=dict(auth))
        check(np.allclose(fp32.outputs[0].as_numpy()[0], probabilities[0], atol=1e-4),
              "infer FP32 = the same image as BYTES")

        if a.token:
            try:
                await client.infer(a.url, InferRequest(a.model, [images]), a.model)
                check(False, "no token is refused")
            except httpx.HTTPStatusError as e:
                check(e.response.status_code == 401, "infer without a token: 401")
    finally:
        await client.close()
    print("all kserve checks passed")


if __name__ == "__main__":
    asyncio.run(main())
