"""The official openai client against the server and the bundled Shapes model."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from engine.serving.api import ServeSettings

openai = pytest.importorskip("openai")  # a test dependency (pyproject's [test] extra)


def test_openai_client_edits_and_generates(live):
    from engine.shapes import analyser, demo, world

    server = live(ServeSettings(model="shapes"))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    buf = io.BytesIO()
    Image.fromarray(world.render(demo.SCENE)).save(buf, "PNG")
    buf.seek(0)
    edited = client.images.edit(
        image=("scene.png", buf, "image/png"), prompt="a large blue circle in the center, on a white background",
        n=1, response_format="b64_json",
        extra_body={"method": "ledits++", "source_prompt": "a large red circle in the center, on a white background"})
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB"))
    assert analyser.describe(img) == "a large blue circle in the center, on a white background"
    made = client.images.generate(prompt="a large green square in the center, on a white background", n=1,
                                  response_format="b64_json", extra_body={"steps": 20, "seed": 0})
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))).convert("RGB"))
    assert "green square" in analyser.describe(img)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", n=1, extra_body={"steps": 2.5})
    assert e.value.body["param"] == "steps"
