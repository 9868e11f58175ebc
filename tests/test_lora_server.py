"""LoRA adapters through the server, with the engine on a thread of the server's process or in a
process of its own (serve's default): `model: <adapter>` picks one, `/v1/models` lists them, and
`/v1/load_lora_adapter` / `unload` change them at run time; both answer as `LLM.generate` does."""

import contextlib

import pytest
import torch

from test_lora import served  # noqa: F401 (a fixture)

pytest.importorskip("fastapi")

MODES = ["in-process", "engine-process"]


@contextlib.contextmanager
def _client(mode: str, root, prompt: list[int]):
    """The server's engine client over the saved base, with no adapter loaded; a random checkpoint has
    no tokenizer and no chat format, so every chat renders to `prompt`."""
    from mistral7b import LLM
    from mistral7b.server import EngineDriver
    from mistral7b.server.engine_client import EngineProcessClient
    from mistral7b.server.engine_process import EngineLoad

    if mode == "in-process":
        llm = LLM(str(root / "base"), device="cpu", max_batch=4, max_loras=2)
        llm.chat_prompt = lambda messages, safe_prompt=False: prompt
        yield EngineDriver(llm)
        return
    load = EngineLoad(source=str(root / "base"), device="cpu", engine={"max_batch": 4, "max_loras": 2})
    client = EngineProcessClient(load, None, "base")
    client.chat_prompt = lambda messages, safe_prompt=False: prompt
    try:
        yield client.warm_up(300)
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference(served):
    """A prompt and LLM.generate's answers to it with adapters a1, a2 and the base model."""
    from mistral7b import LLM, LoRARequest, SamplingParams

    root, hf, _ = served
    llm = LLM(str(root / "base"), device="cpu", max_batch=4, max_loras=2)
    prompt = torch.randint(0, hf.config.vocab_size, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    want = {name: llm.generate([prompt], params, lora=LoRARequest(name, str(root / name)))[0] for name in ("a1", "a2")}
    want["base"] = llm.generate([prompt], params)[0]
    return prompt, want


@pytest.mark.parametrize("mode", MODES)
def test_server_picks_adapters_by_model_and_loads_unloads_them(served, reference, mode):
    """`model: <adapter>` answers as LLM.generate(..., lora=...); /v1/models lists adapters; load and
    unload work at run time; an unknown adapter is a 404 naming it. The same in both engine modes."""
    import httpx

    from mistral7b.cli.common import CLIError
    from mistral7b.cli.serve import load_lora_modules
    from mistral7b.server import ServerThread, build_app

    root, _, _ = served
    prompt, want = reference
    with _client(mode, root, prompt) as client, \
            ServerThread(build_app(client, "base"), log_level="warning") as server, \
            httpx.Client(base_url=server.url) as http:
        def complete(model):
            return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0, "logprobs": 1, "ignore_eos": True})

        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base"]
        r = complete("a1")
        assert r.status_code == 404 and "'a1' does not exist" in r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(root / "a1")})
        assert r.status_code == 200, r.text
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(root / "a2")}).status_code == 200
        models = http.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("a1", "base"), ("a2", "base")]
        for name in ("a1", "a2", "base"):
            r = complete(name)
            assert r.status_code == 200, r.text
            logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert logprobs == pytest.approx([lp.logprob for lp in want[name].logprobs], abs=1e-5)
            assert r.json()["model"] == name  # the adapter's name, as vLLM answers
            assert _streamed_models(http, "/v1/completions", {"prompt": prompt}, name) == {name}
            chat = {"messages": [{"role": "user", "content": "hello"}]}
            assert _streamed_models(http, "/v1/chat/completions", chat, name) == {name}
        assert want["a1"].token_ids != want["a2"].token_ids or want["a1"].logprobs != want["a2"].logprobs
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(root / "a1")})
        assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "nowhere")})
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "~no_such_user_m7b/a"})
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]  # not a 500
        with pytest.raises(CLIError, match="--lora-modules y=.*adapter_config.json") as e:  # serve's start-up load
            load_lora_modules(client, [("y", str(root / "nowhere"))])
        assert "\n" not in str(e.value)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 200
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
        assert r.status_code == 404 and "'a1'" in r.json()["error"]["message"]
        r = complete("a1")
        assert r.status_code == 404 and "'a1' does not exist" in r.json()["error"]["message"]
        assert "'a2'" in r.json()["error"]["message"]  # the 404 names what is served


def _streamed_models(http, route, body, model) -> set[str]:
    """The `model` of every chunk of a streamed request (with the usage chunk) and of its answer unstreamed."""
    import json as json_

    body = {**body, "model": model, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    with http.stream("POST", route, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        chunks = [json_.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    r = http.post(route, json=body)
    assert r.status_code == 200, r.text
    assert len(chunks) > 2 and chunks[-1]["usage"] is not None
    return {c["model"] for c in chunks} | {r.json()["model"]}




def test_an_engine_client_without_adapters_refuses_them_in_one_line():
    """A client with no adapter registry: the base model is served, and a load is a clear 400."""
    import asyncio

    from mistral7b.server.errors import APIError
    from mistral7b.server.serving_models import LoadLoRAAdapterRequest, ServedModels

    models = ServedModels(object(), "base")  # a client with no adapter registry
    assert models.resolve("base") is None and [c.id for c in models.cards(0, None)] == ["base"]
    with pytest.raises(APIError) as e:
        asyncio.run(models.load(LoadLoRAAdapterRequest(lora_name="a", lora_path="/nowhere")))
    assert e.value.status == 400 and "does not run LoRA adapters" in e.value.message
    with pytest.raises(APIError) as e:
        models.resolve("a")
    assert e.value.status == 404 and "'a' does not exist" in e.value.message
