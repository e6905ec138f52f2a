"""The Postman collection's API v1 folder, replayed in order against the real stack: each
request as Postman sends it (variables, bearer auth, headers, raw JSON body), each status its
test script expects, and the variables its scripts save (`apiKey`, `conversationId`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from tests.conftest import make_settings
from tests.support.model_servers import ModelServer
from tests.support.stack import Stack

COLLECTION = Path(__file__).resolve().parents[2] / "docs" / "postman_collection.json"
FOLDER = "API v1: accounts and conversations"
MASTER = "postman-master-token-" + "x" * 20
SAVED = re.compile(r'pm\.collectionVariables\.set\("(\w+)", body\.(\w+)\);')
STATUS = re.compile(r"to\.have\.status\((\d+)\)")
ONE_OF = re.compile(r"to\.be\.oneOf\((\[[\d, ]+\])\)")


@pytest.fixture
def stack_settings(redis_url: str, model_server: ModelServer) -> Settings:
    return make_settings(
        redis_url, openai_base_url=model_server.openai_base_url, master_token=MASTER
    )


def _fill(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\{\{(\w+)\}\}", lambda found: variables[found.group(1)], text)


def _request(item: dict[str, Any], variables: dict[str, str]) -> httpx.Request:
    request = item["request"]
    headers = {h["key"]: _fill(h["value"], variables) for h in request.get("header", [])}
    auth = request.get("auth", {"type": "noauth"})
    if auth["type"] == "bearer":
        headers["Authorization"] = "Bearer " + _fill(auth["bearer"][0]["value"], variables)
    body = request.get("body", {}).get("raw")
    return httpx.Request(
        request["method"],
        _fill(request["url"]["raw"], variables),
        headers=headers,
        content=None if body is None else _fill(body, variables).encode(),
    )


async def test_the_api_v1_folder_runs_in_order(stack: Stack) -> None:
    collection = json.loads(COLLECTION.read_text())
    folder = next(item for item in collection["item"] if item["name"] == FOLDER)
    variables = {entry["key"]: entry["value"] for entry in collection["variable"]}
    variables |= {"baseUrl": stack.url, "masterToken": MASTER}
    async with httpx.AsyncClient() as http:
        for item in folder["item"]:
            script = "\n".join(item["event"][0]["script"]["exec"])
            response = await http.send(_request(item, variables))
            if (exact := STATUS.search(script)) is not None:
                expected = [int(exact.group(1))]
            else:
                one_of = ONE_OF.search(script)
                assert one_of is not None, item["name"]
                expected = [200]  # the master token is set here: the admin calls succeed
            assert response.status_code in expected, (item["name"], response.text)
            for variable, field in SAVED.findall(script):
                variables[variable] = response.json()[field]
    assert variables["apiKey"].startswith("chat_") and variables["conversationId"]
