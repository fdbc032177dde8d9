"""Tests for jaxgpt.openai_api: OpenAI's request fields and response shapes, without a server
(tests/serve/test_app.py sends the same through a real one)."""
import pytest

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.sampling import MAX_TOP_LOGPROBS, SamplingParams
from jaxgpt.serve import openai_api
from jaxgpt.serve.openai_api import ApiError, LogprobFormat


def refused(call) -> ApiError:
    with pytest.raises(ApiError) as e:
        call()
    return e.value


@pytest.mark.parametrize("kind, good, bad", [(openai_api.INT, 3, 3.0), (openai_api.INT, 3, True),
                                             (openai_api.NUMBER, 0.5, "0.5"),
                                             ("a boolean", False, 0),
                                             ("a string", "x", ["x"]), ("an object", {}, [])])
def test_typed_field_takes_its_kind_and_names_the_field_it_refuses(kind, good, bad):
    assert openai_api.typed_field({"f": good}, "f", kind) == good
    assert openai_api.typed_field({"f": None}, "f", kind, "default") == "default"
    assert openai_api.typed_field({}, "f", kind, "default") == "default"
    e = refused(lambda: openai_api.typed_field({"f": bad}, "f", kind))
    assert (e.status, e.param, e.code) == (400, "f", "invalid_type")
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error",
                                  "param": "f", "code": "invalid_type"}}
    assert e.message.startswith(f"f: expected {kind}, got ")


def test_chat_messages_join_text_parts_and_read_developer_as_system():
    body = {"messages": [{"role": "developer", "content": "be brief", "name": "ignored"},
                         {"role": "user", "content": [{"type": "text", "text": "hel"},
                                                      {"type": "text", "text": "lo"}]}]}
    assert openai_api.chat_messages(body) == [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hello"}]
    assert refused(lambda: openai_api.chat_messages({})).code == "missing_required_parameter"
    assert refused(lambda: openai_api.chat_messages({"messages": []})).code == "invalid_type"
    image = {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": "x"}}]}]}
    assert refused(lambda: openai_api.chat_messages(image)).message == \
        "messages[0].content: only text content parts are supported"


def test_sampling_params_fill_what_the_body_leaves_out():
    defaults = SamplingParams(temperature=0.7, top_k=40)
    body = {"temperature": 0, "stop": "\n", "seed": 5, "top_p": 0.9, "unknown": 1}
    got = openai_api.sampling_params(body, defaults, max_tokens=12, top_logprobs=2)
    assert (got.temperature, got.top_k, got.top_p, got.stop, got.seed, got.max_tokens,
            got.top_logprobs) == (0, 40, 0.9, ("\n",), 5, 12, 2)
    assert openai_api.sampling_params({"stop": ["a", "b"]}, defaults, 1, 0).stop == ("a", "b")
    # a fresh seed, as at OpenAI
    assert 0 <= openai_api.sampling_params({}, defaults, 1, 0).seed < 2 ** 31
    assert refused(
        lambda: openai_api.sampling_params({"stop": ["a", 1]}, defaults, 1, 0)).param == "stop"
    assert refused(
        lambda: openai_api.sampling_params({"top_k": 2.5}, defaults, 1, 0)).param == "top_k"


def test_requested_max_tokens_prefers_the_newer_name():
    assert openai_api.requested_max_tokens({"max_tokens": 5, "max_completion_tokens": 7}) == (
        7, "max_completion_tokens")
    assert openai_api.requested_max_tokens({"max_tokens": 5}) == (5, "max_tokens")
    assert openai_api.requested_max_tokens({}) == (None, "max_tokens")


def test_logprob_request_in_each_endpoint_shape():
    assert openai_api.logprob_request({}, "chat") is None
    assert openai_api.logprob_request({"logprobs": True}, "chat") == 0
    assert openai_api.logprob_request({"logprobs": True, "top_logprobs": 3}, "chat") == 3
    assert refused(
        lambda: openai_api.logprob_request({"top_logprobs": 3}, "chat")).param == "top_logprobs"
    assert openai_api.logprob_request({"logprobs": 2}, "completion") == 2
    too_many = refused(lambda: openai_api.logprob_request({"logprobs": MAX_TOP_LOGPROBS + 1},
                                                          "completion"))
    assert too_many.message == (f"logprobs: must be in [0, {MAX_TOP_LOGPROBS}], "
                                f"got {MAX_TOP_LOGPROBS + 1}")


def test_logprob_format_chat_and_completions():
    tok = Tokenizer.from_spec("char", corpus="abc")
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    chat = LogprobFormat(tok, "chat")([a, b], [-0.5, -1.0], [[(a, -0.5), (b, -2.0)], [(b, -1.0)]])
    assert chat == {"content": [
        {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
            {"token": "a", "logprob": -0.5, "bytes": [97]},
            {"token": "b", "logprob": -2.0, "bytes": [98]}]},
        {"token": "b", "logprob": -1.0, "bytes": [98], "top_logprobs": [
            {"token": "b", "logprob": -1.0, "bytes": [98]}]}],
        "refusal": None}
    completion = LogprobFormat(tok, "completion")([a, b, a], [-0.5, -1.0, -0.25], [], offset=10)
    assert completion == {"tokens": ["a", "b", "a"], "token_logprobs": [-0.5, -1.0, -0.25],
                          "top_logprobs": [{}, {}, {}], "text_offset": [10, 11, 12]}


def test_sse_and_usage():
    assert openai_api.sse("[DONE]") == "data: [DONE]\n\n"
    assert openai_api.sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert openai_api.usage(7, []) == {"prompt_tokens": 7, "completion_tokens": 0,
                                       "total_tokens": 7}


def test_field_of_reads_the_field_a_message_starts_with():
    assert openai_api.field_of("top_p=1.5 must be in (0, 1]", "messages") == "top_p"
    assert openai_api.field_of("n: at most 2", "messages") == "n"
    assert openai_api.field_of("the conversation is too long", "messages") == "messages"
