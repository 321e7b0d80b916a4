"""Drives the real provider SDKs with their default settings (only the API
key from the environment; a base URL only when the test says so) and prints
one JSON line per SDK: the text of a plain call, the text of a streamed
call, or the error the SDK raised. Run by tests/tests/sdk.rs with the venv
`cargo xtask setup` makes; never talks to anything but what the test set up
(kt, on loopback)."""

import json
import os
import sys

PROMPT = [{"role": "user", "content": "hi"}]


def failure(e):
    body = getattr(e, "body", None)
    return {
        "error": type(e).__name__,
        "status": getattr(e, "status_code", None) or getattr(e, "code", None),
        "code": getattr(e, "code", None) if isinstance(getattr(e, "code", None), str) else None,
        "body": body if isinstance(body, (dict, list, str)) else repr(body),
        "message": str(e)[:400],
    }


def run_openai(stream):
    import openai

    client = openai.OpenAI()
    try:
        if not stream:
            r = client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
            return {"text": r.choices[0].message.content}
        parts = []
        for chunk in client.chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return {"text": "".join(parts)}
    except openai.APIError as e:
        return failure(e)


def run_azure(stream):
    import openai

    # AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and OPENAI_API_VERSION
    # from the environment, as the SDK documents; the model is the deployment.
    client = openai.AzureOpenAI()
    try:
        if not stream:
            r = client.chat.completions.create(model="gpt-4o", messages=PROMPT)
            return {"text": r.choices[0].message.content}
        parts = []
        for chunk in client.chat.completions.create(
            model="gpt-4o", messages=PROMPT, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return {"text": "".join(parts)}
    except openai.APIError as e:
        return failure(e)


def run_anthropic(stream):
    import anthropic

    client = anthropic.Anthropic()
    try:
        if not stream:
            m = client.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=16, messages=PROMPT
            )
            return {"text": m.content[0].text}
        parts = []
        for event in client.messages.create(
            model="claude-3-5-haiku-latest", max_tokens=16, messages=PROMPT, stream=True
        ):
            if event.type == "content_block_delta":
                parts.append(event.delta.text)
        return {"text": "".join(parts)}
    except anthropic.APIError as e:
        return failure(e)


def run_gemini(stream):
    from google import genai
    from google.genai import errors, types

    kwargs = {}
    base = os.environ.get("KT_TEST_GEMINI_BASE_URL")
    if base:
        kwargs["http_options"] = types.HttpOptions(base_url=base)
    client = genai.Client(**kwargs)
    try:
        if not stream:
            r = client.models.generate_content(model="gemini-2.0-flash", contents="hi")
            return {"text": r.text}
        parts = [
            c.text or ""
            for c in client.models.generate_content_stream(
                model="gemini-2.0-flash", contents="hi"
            )
        ]
        return {"text": "".join(parts)}
    except errors.APIError as e:
        return failure(e)


def run_groq(stream):
    import groq

    # GROQ_API_KEY (and GROQ_BASE_URL when the test sets one) from the env.
    client = groq.Groq()
    try:
        if not stream:
            r = client.chat.completions.create(model="llama-3.1-8b-instant", messages=PROMPT)
            return {"text": r.choices[0].message.content}
        parts = []
        for chunk in client.chat.completions.create(
            model="llama-3.1-8b-instant", messages=PROMPT, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return {"text": "".join(parts)}
    except groq.APIError as e:
        return failure(e)


def run_mistral(stream):
    from mistralai.client import Mistral
    from mistralai.client import errors

    # MISTRAL_API_KEY from the env; the SDK has no base-URL variable, only
    # its documented `server_url` argument.
    kwargs = {}
    base = os.environ.get("KT_TEST_MISTRAL_BASE_URL")
    if base:
        kwargs["server_url"] = base
    client = Mistral(**kwargs)
    try:
        if not stream:
            r = client.chat.complete(model="mistral-small-latest", messages=PROMPT)
            return {"text": r.choices[0].message.content}
        parts = []
        for event in client.chat.stream(model="mistral-small-latest", messages=PROMPT):
            c = event.data.choices[0].delta.content if event.data.choices else None
            if isinstance(c, str):
                parts.append(c)
        return {"text": "".join(parts)}
    except errors.MistralError as e:
        r = failure(e)
        r["status"] = e.status_code
        r["body"] = e.body
        return r


def run_cohere(stream):
    import cohere
    from cohere.core.api_error import ApiError

    # CO_API_KEY (and CO_API_URL when the test sets one) from the env.
    client = cohere.ClientV2()
    try:
        if not stream:
            r = client.chat(model="command-a-03-2025", messages=PROMPT)
            return {"text": r.message.content[0].text}
        parts = []
        for event in client.chat_stream(model="command-a-03-2025", messages=PROMPT):
            if event.type == "content-delta":
                parts.append(event.delta.message.content.text)
        return {"text": "".join(parts)}
    except ApiError as e:
        r = failure(e)
        r["status"] = e.status_code
        return r


def run_huggingface(stream):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    # HF_TOKEN from the env; the router's auto provider (no Hub lookup).
    # A base URL only through the documented `base_url` argument.
    kwargs = {}
    base = os.environ.get("KT_TEST_HF_BASE_URL")
    if base:
        kwargs["base_url"] = base
    client = InferenceClient(**kwargs)
    model = None if base else "meta-llama/Llama-3.1-8B-Instruct"
    try:
        if not stream:
            r = client.chat_completion(PROMPT, model=model)
            return {"text": r.choices[0].message.content}
        parts = []
        for chunk in client.chat_completion(PROMPT, model=model, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return {"text": "".join(parts)}
    except HfHubHTTPError as e:
        return {
            "error": type(e).__name__,
            "status": e.response.status_code if e.response is not None else None,
            "message": str(e)[:400],
        }


def bedrock_call(client, stream):
    from botocore.exceptions import ClientError

    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    model = "amazon.nova-micro-v1:0"
    try:
        if not stream:
            r = client.converse(modelId=model, messages=messages)
            return {"text": r["output"]["message"]["content"][0]["text"]}
        parts = []
        for event in client.converse_stream(modelId=model, messages=messages)["stream"]:
            if "contentBlockDelta" in event:
                parts.append(event["contentBlockDelta"]["delta"].get("text", ""))
        return {"text": "".join(parts)}
    except ClientError as e:
        return {
            "error": type(e).__name__,
            "code": e.response.get("Error", {}).get("Code"),
            "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            "message": str(e)[:400],
        }


def run_bedrock(stream):
    import boto3

    # AWS_BEARER_TOKEN_BEDROCK (a Bedrock API key) and AWS_DEFAULT_REGION
    # from the env, AWS_ENDPOINT_URL_BEDROCK_RUNTIME when the test sets one.
    return bedrock_call(boto3.client("bedrock-runtime"), stream)


def run_bedrock_sigv4(stream):
    import boto3

    # Plain AWS access keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY from
    # the env): botocore signs with SigV4, which kt cannot swap.
    os.environ.pop("AWS_BEARER_TOKEN_BEDROCK", None)
    return bedrock_call(boto3.client("bedrock-runtime"), stream)


RUNNERS = {
    "openai": run_openai,
    "anthropic": run_anthropic,
    "gemini": run_gemini,
    "azure": run_azure,
    "groq": run_groq,
    "mistral": run_mistral,
    "cohere": run_cohere,
    "huggingface": run_huggingface,
    "bedrock": run_bedrock,
    # Last: it drops the Bedrock API key from this process's env.
    "bedrock-sigv4": run_bedrock_sigv4,
}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        for stream in (False, True):
            try:
                result = RUNNERS[name](stream)
            except Exception as e:  # a transport error: the test shows it
                result = {"error": type(e).__name__, "message": str(e)[:400]}
            result.update({"sdk": name, "stream": stream})
            print(json.dumps(result), flush=True)
