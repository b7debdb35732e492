"""The playground in chromium against the real server: its controls (names, API defaults and
ranges, validation that blocks Send), a reply streamed in with its stats, max_tokens obeyed, Stop
aborting the request on the server, json_schema replies that fit their schema, API errors shown
as alerts, the request shown as code, accessibility, and screenshots at desktop and phone widths.
Replies are kept short (max_tokens <= 40) except the one Stop ends."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import pytest

from browser_kit import DESKTOP, PHONE, axe_violations, refused, screenshot, sign_in

REPLY_TIMEOUT_MS = 120_000  # a CPU server shared with other tests: generous, never asserted
# name: (API default, min, max or None when unbounded); max_tokens: the server's default and
# the served context (conftest's --max-model-len).
CONTROLS = {
    "max_tokens": (512, 1, 1024),
    "temperature": (1, 0, 2),
    "top_p": (1, 0.01, 1),
    "min_p": (0, 0, 1),
    "top_k": (-1, -1, None),
    "presence_penalty": (0, -2, 2),
    "frequency_penalty": (0, -2, 2),
    "repetition_penalty": (1, 0.01, 2),
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture
def playground(open_page, web_server):
    """playground(viewport=DESKTOP, signed_in=True): the playground page, the admin key typed
    into its key field; `page.sent` lists the bodies of the chat requests it makes."""

    def open_(viewport: dict = DESKTOP, signed_in: bool = True, path: str = "/playground"):
        page = open_page(path, viewport)
        page.sent = []
        page.on("request", lambda r: "/v1/chat/completions" in r.url
                and page.sent.append(json.loads(r.post_data)))
        if signed_in:
            sign_in(page, web_server.key)
        return page

    return open_


def control(page, name: str):
    return page.get_by_label(name, exact=True)


def type_message(page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)


def send(page, text: str) -> None:
    type_message(page, text)
    page.get_by_role("button", name="Send", exact=True).click()


def last_reply(page):
    return page.locator("#conversation .reply").last


def wait_for_reply(page):
    """The last reply, once it has finished (its stats are written at the end)."""
    reply = last_reply(page)
    reply.locator(".reply-stats").wait_for(timeout=REPLY_TIMEOUT_MS)
    return reply


def test_every_control_is_labelled_with_the_api_defaults_and_ranges(playground, model_id):
    page = playground()
    assert control(page, "Model").input_value() == model_id
    assert control(page, "System Prompt").input_value() == ""
    assert page.get_by_role("heading", name="Model Configuration").is_visible()
    for name, (default, minimum, maximum) in CONTROLS.items():
        field = control(page, name)
        assert field.get_attribute("type") == "number", name
        assert float(field.input_value()) == default, name
        assert float(field.get_attribute("min")) == minimum, name
        if maximum is None:
            assert field.get_attribute("max") is None, name
        else:
            assert float(field.get_attribute("max")) == maximum, name
        help_id = field.get_attribute("aria-describedby").split()[0]
        assert page.locator(f"#{help_id}").inner_text().strip(), name
    response_format = control(page, "Response format")
    assert response_format.input_value() == "text"
    assert response_format.locator("option").all_inner_texts() == [
        "text", "json_object", "json_schema"]
    assert not control(page, "JSON schema").is_visible()
    assert control(page, "Message").is_visible()
    assert page.get_by_role("button", name="Stop").is_disabled()


def test_the_model_in_the_url_is_preselected_and_an_unknown_one_is_ignored(playground, model_id):
    page = playground(path=f"/playground?model={model_id}")
    assert control(page, "Model").input_value() == model_id
    page = playground(path="/playground?model=no/such-model")
    assert control(page, "Model").input_value() == model_id  # the first (only) served model


def test_invalid_values_are_reported_beside_their_control_and_block_send(playground):
    page = playground()
    temperature = control(page, "temperature")
    temperature.fill("3")
    error = page.locator("#param-temperature-error")
    assert error.is_visible() and "2" in error.inner_text()  # the browser's range message
    assert temperature.get_attribute("aria-invalid") == "true"
    control(page, "max_tokens").fill("")
    assert page.locator("#param-max_tokens-error").is_visible()
    send(page, "Hello")
    status = page.locator("#composer-status")
    assert status.inner_text() == "Fix max_tokens, temperature first."
    assert page.evaluate("() => document.activeElement.id") == "param-max_tokens"
    assert page.locator("#conversation .turn").count() == 0 and page.sent == []
    page.get_by_role("button", name="Reset").click()
    assert control(page, "temperature").input_value() == "1"
    assert control(page, "max_tokens").input_value() == "512"
    assert not error.is_visible() and temperature.get_attribute("aria-invalid") is None


def test_a_message_gets_a_reply_streamed_in_with_its_stats(playground, model_id):
    page = playground()
    # Every text the reply shows on its way, as the page changes it.
    page.evaluate("""() => {
        window.__replyTexts = [];
        new MutationObserver(() => {
            const text = document.querySelector('#conversation .reply:last-of-type .turn-text');
            const seen = window.__replyTexts;
            if (text && text.textContent && text.textContent !== seen[seen.length - 1]) {
                seen.push(text.textContent);
            }
        }).observe(document.getElementById('conversation'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    control(page, "max_tokens").fill("40")
    control(page, "temperature").fill("0")  # the same reply at every run
    send(page, "Write a short poem about the sea.")
    assert page.locator("#conversation .turn.user .turn-text").inner_text() \
        == "Write a short poem about the sea."
    reply = wait_for_reply(page)
    final = reply.locator(".turn-text").text_content()
    texts = page.evaluate("() => window.__replyTexts")
    assert len(texts) > 1 and texts[-1] == final  # it grew in steps: streamed
    assert all(final.startswith(text) for text in texts)  # each step appended to the last
    assert re.fullmatch(r"\d+ tokens?", reply.locator(".stat-tokens").inner_text())
    assert re.fullmatch(r"[\d,]+ ms to first token", reply.locator(".stat-ttft").inner_text())
    assert re.fullmatch(r"\d+\.\d tokens/s", reply.locator(".stat-tps").inner_text())
    assert re.fullmatch(r"\$\d+\.\d+", reply.locator(".stat-cost").inner_text())
    # max_tokens always, and the one sampling field not at its default.
    assert page.sent == [{
        "model": model_id,
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "max_tokens": 40, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}]
    assert page.get_by_role("button", name="Send", exact=True).is_enabled()
    assert page.get_by_role("button", name="Stop").is_disabled()


def test_max_tokens_5_gives_a_reply_of_5_tokens_and_ctrl_enter_sends(playground):
    page = playground()
    control(page, "max_tokens").fill("5")
    control(page, "temperature").fill("0")
    type_message(page, "Count from 1 to 100")
    page.get_by_label("Message", exact=True).press("Control+Enter")
    reply = wait_for_reply(page)
    assert reply.locator(".stat-tokens").inner_text() == "5 tokens"
    assert len(page.sent) == 1
    assert {k: v for k, v in page.sent[0].items() if k not in ("model", "messages")} == {
        "max_tokens": 5, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}
    assert page.get_by_label("Message", exact=True).input_value() == ""


def running_requests(web_server, model_id: str) -> float:
    text = httpx.get(web_server.base_url + "/metrics", timeout=10).text
    found = re.search(rf'^tokenmill_requests_running{{model="{re.escape(model_id)}"}} (\S+)$',
                      text, re.M)
    assert found, "no tokenmill_requests_running gauge for the model"
    return float(found.group(1))


def test_stop_ends_a_long_reply_on_the_server_and_regenerate_replaces_it(playground, web_server,
                                                                        model_id):
    page = playground()
    since = int(time.time()) - 1

    def long_reply(route):
        # Test-only, at the network layer: a reply that cannot end before Stop (no EOS).
        body = json.loads(route.request.post_data)
        body.update(ignore_eos=True, max_tokens=900)
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", long_reply)
    control(page, "max_tokens").fill("40")
    send(page, "Tell me a long story.")
    stop = page.get_by_role("button", name="Stop")
    page.wait_for_function(
        "() => document.querySelector('#conversation .reply .turn-text').textContent.length > 0",
        timeout=REPLY_TIMEOUT_MS)
    assert stop.is_enabled()
    stop.click()
    deadline = time.monotonic() + 30
    while running_requests(web_server, model_id) != 0:
        assert time.monotonic() < deadline, "the request still runs 30 s after Stop"
        time.sleep(0.25)
    reply = wait_for_reply(page)
    assert "stopped" in reply.get_attribute("class").split()
    assert re.fullmatch(r"stopped after [\d,]+ ms", reply.locator(".stat-stopped").inner_text())
    assert reply.locator(".stat-tokens").count() == 0  # no made-up token count
    assert reply.locator(".turn-text").text_content()  # the partial reply stays
    assert stop.is_disabled()

    headers = {"Authorization": f"Bearer {web_server.key}"}
    deadline = time.monotonic() + 30
    while True:
        records = httpx.get(web_server.v1 + "/usage", params={"start": since, "limit": 1000},
                            headers=headers, timeout=10).json()["data"]
        if any(r["status"] == "aborted" and r["model"] == model_id for r in records):
            break
        assert time.monotonic() < deadline, f"no aborted record in the ledger: {records}"
        time.sleep(0.25)

    page.unroute("**/v1/chat/completions")
    page.get_by_role("button", name="Regenerate").click()
    reply = wait_for_reply(page)
    assert page.locator("#conversation .reply").count() == 1  # replaced, not added
    assert "stopped" not in reply.get_attribute("class").split()
    assert re.fullmatch(r"\d+ tokens?", reply.locator(".stat-tokens").inner_text())
    # The stopped reply was not sent back: the same single user turn, run again.
    assert page.sent[-1]["messages"] == page.sent[0]["messages"] == [
        {"role": "user", "content": "Tell me a long story."}]
    page.get_by_role("button", name="Clear").click()
    assert page.locator("#conversation .turn").count() == 0


def test_a_json_schema_reply_fits_the_schema_and_an_invalid_schema_blocks_send(playground):
    page = playground()
    control(page, "Response format").select_option("json_schema")
    editor = control(page, "JSON schema")
    status = page.locator("#schema-status")
    assert editor.is_visible() and json.loads(editor.input_value())["type"] == "object"
    editor.fill('{"type": "object",')
    assert status.inner_text().startswith("Invalid JSON: ")
    editor.fill("[1, 2]")
    assert "must be a JSON object" in status.inner_text()
    send(page, "Hello")
    assert page.locator("#composer-status").inner_text() == "Fix JSON schema first."
    assert page.locator("#conversation .turn").count() == 0 and page.sent == []

    editor.fill(json.dumps(PERSON_SCHEMA, indent=2))
    assert status.inner_text() == "Valid: a JSON object."
    control(page, "Schema name").fill("person")
    control(page, "max_tokens").fill("40")
    control(page, "temperature").fill("0")
    send(page, "Describe a person called Ann who is 30 years old.")
    reply = wait_for_reply(page)
    answer = json.loads(reply.locator(".turn-text").text_content())
    jsonschema.validate(answer, PERSON_SCHEMA)
    assert page.sent[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}


def test_json_object_sends_its_response_format_and_text_sends_none(playground):
    page = playground()
    page.get_by_text("View code", exact=True).click()
    control(page, "Response format").select_option("json_object")
    assert '"type": "json_object"' in page.locator("#code-snippet").inner_text()
    control(page, "Response format").select_option("text")
    assert "response_format" not in page.locator("#code-snippet").inner_text()


def alert_in_conversation(page):
    alert = page.locator("#conversation [role=alert]").last
    alert.wait_for(timeout=REPLY_TIMEOUT_MS)
    return alert.inner_text()


def test_api_errors_show_the_servers_message_in_an_alert(open_page, web_server, model_id):
    # chromium logs each refused fetch as a console error: those three and nothing else
    page = open_page("/playground", allowed=(refused(401, "Unauthorized"),
                                             refused(400, "Bad Request")))
    send(page, "Hello")  # no key entered
    assert alert_in_conversation(page) == \
        "This server needs an API key: enter one in the API key field."

    wrong = "sk-tm-" + "0" * 40
    server_says = httpx.post(web_server.v1 + "/chat/completions", timeout=10, json={},
                             headers={"Authorization": f"Bearer {wrong}"})
    assert server_says.status_code == 401
    sign_in(page, wrong)
    page.get_by_role("button", name="Regenerate").click()
    assert alert_in_conversation(page) == server_says.json()["error"]["message"]

    # A value the page would never send, put in at the network layer: the server's 400.
    bad = {"model": model_id, "messages": [{"role": "user", "content": "Hello"}],
           "max_tokens": 5, "temperature": 5, "stream": True}
    server_says = httpx.post(web_server.v1 + "/chat/completions", json=bad, timeout=10,
                             headers={"Authorization": f"Bearer {web_server.key}"})
    assert server_says.status_code == 400
    page.route("**/v1/chat/completions", lambda route: route.continue_(
        post_data=json.dumps({**json.loads(route.request.post_data), "temperature": 5})))
    sign_in(page, web_server.key)
    page.get_by_role("button", name="Regenerate").click()
    assert alert_in_conversation(page) == server_says.json()["error"]["message"]
    assert page.locator("#conversation .reply").count() == 1  # each retry replaced the last


def test_a_reply_cut_off_before_done_is_marked_failed_not_complete(playground):
    page = playground()
    # A stream as a dropped connection leaves it: content, then the body ends, no [DONE].
    chunk = {"choices": [{"index": 0, "delta": {"content": "Half a rep"}, "finish_reason": None}]}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=f"data: {json.dumps(chunk)}\n\n"))
    send(page, "Hello")
    assert alert_in_conversation(page) == \
        "The reply was cut off: the stream ended before it was complete."
    reply = last_reply(page)
    assert "failed" in reply.get_attribute("class") and reply.locator(".reply-stats").count() == 0


def curl_body(code: str) -> dict:
    """The JSON body of a cURL example (`-d '...'`, each ' in it written '\\'')."""
    return json.loads(code.split(" -d '", 1)[1].rsplit("'", 1)[0].replace("'\\''", "'"))


def test_view_code_shows_the_next_request_and_follows_the_settings(playground, web_server,
                                                                   model_id):
    page = playground()
    page.get_by_text("View code", exact=True).click()
    code = page.locator("#code-snippet")
    control(page, "System Prompt").fill("Be brief: it's late.")
    control(page, "max_tokens").fill("8")
    type_message(page, "Hello")
    text = code.inner_text()
    assert f'"{web_server.v1}/chat/completions"' in text and web_server.key not in text
    assert curl_body(text) == {
        "model": model_id,
        "messages": [{"role": "system", "content": "Be brief: it's late."},
                     {"role": "user", "content": "Hello"}],
        "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    control(page, "temperature").fill("0.5")
    assert curl_body(code.inner_text())["temperature"] == 0.5
    page.get_by_text("Python", exact=True).click()
    python = code.inner_text()
    assert "temperature=0.5," in python and "max_tokens=8," in python
    compile(python, "example.py", "exec")
    page.get_by_text("JavaScript", exact=True).click()
    assert "temperature: 0.5," in code.inner_text()

    # After an exchange the code carries the conversation, then the next typed message.
    control(page, "temperature").fill("0")  # the same reply at every run
    page.get_by_role("button", name="Send", exact=True).click()
    reply = wait_for_reply(page).locator(".turn-text").text_content()
    page.get_by_text("cURL", exact=True).click()
    type_message(page, "And again")
    assert curl_body(code.inner_text())["messages"] == [
        {"role": "system", "content": "Be brief: it's late."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": reply}, {"role": "user", "content": "And again"}]
    control(page, "temperature").fill("9")
    assert code.inner_text() == "Fix temperature to see the code."


@pytest.mark.parametrize("width", ["desktop", "phone"])
def test_the_playground_passes_axe_and_fits_desktop_and_phone_widths(playground, width):
    viewport = DESKTOP if width == "desktop" else PHONE
    page = playground(viewport)
    assert axe_violations(page) == []
    control(page, "System Prompt").fill("You are a helpful assistant.")
    control(page, "max_tokens").fill("24")
    send(page, "What is the capital of France?")
    wait_for_reply(page)
    page.get_by_text("View code", exact=True).click()
    assert axe_violations(page) == []
    assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
    screenshot(page, f"playground-{width}")
