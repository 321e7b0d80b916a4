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


RUNNERS = {
    "openai": run_openai,
    "anthropic": run_anthropic,
    "gemini": run_gemini,
    "azure": run_azure,
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
