"""The web playground: a static page the Gateway serves at / beside the API (serve/README.md).
Plain HTML, CSS and JavaScript, every asset in this folder: no build step, no CDN.

The page holds no secret, so its files are open (the gateway's `RequestGuard.OPEN_PATHS`): a browser
cannot send a bearer token when it navigates. The page asks for the token once, keeps it in the
tab's sessionStorage and sends it on every API call, which stays guarded."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

FOLDER = Path(__file__).parent
# URL path -> the file it serves; nothing else in the folder is reachable.
PAGE_FILES = {
    "/": "index.html",
    "/playground/playground.js": "playground.js",
    "/playground/playground.css": "playground.css",
}


def add_page(api: FastAPI) -> None:
    for path, name in PAGE_FILES.items():
        api.add_api_route(path, _serve(FOLDER / name), methods=["GET"], include_in_schema=False)


def _serve(file: Path):
    async def page_file() -> FileResponse:
        return FileResponse(file, headers={"Cache-Control": "no-cache"})  # a new deploy's page, not a stale one

    return page_file
