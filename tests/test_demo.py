"""`tinysr demo`: the Gradio app served on 127.0.0.1 and driven through `gradio_client`, and (slow) the Space's app.py
in a real headless Chromium driven by selenium: real photos in, outputs of exactly round(outscale * size) out, clear
messages for bad files, oversized inputs and missing models. Every server and browser started here is stopped here.

The apps serve the shipped default model (the `model_args` fixture passes no `--model`), as `tinysr demo` does out
of the box.
"""

import argparse
import importlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import PIL.Image
import pytest
import torch

from tests.tiny_pipelines import photo
from tinysr_diffusers import demo as demo_module
from tinysr_diffusers.demo import INSTALL_HINT, add_demo_parser, launch
from tinysr_diffusers.loading import load_pipeline


REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots of the browser test (git-ignored)
SPACE_APP = REPO / "spaces" / "tinysr" / "app.py"
MAX_PIXELS = 3000  # the input limit of the client test's app: PHOTO_SIZE and TILED_SIZE are under it
PHOTO_SIZE = (27, 18)
TILED_SIZE = (72, 40)  # 2 latent tiles of 32 (latent 36x20 after the 4x)
TOO_LARGE_SIZE = (60, 51)


def _require(module: str):
    """Import `module`; without it the test is skipped, except in CI, whose .ci/run installs it: there it fails."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs the demo extra ({INSTALL_HINT})")


_require("gradio")
# gradio's queue calls pandas options that pandas 3 deprecates: its own business, not this suite's.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
gradio_client = _require("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_args() -> list[str]:
    """The model options of every app in this file: none, so the app serves the shipped default model
    (`TinySRPipeline.from_pretrained()`), as `tinysr demo` does out of the box."""
    return []


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinysr")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def reference(model_args):
    """The same model loaded here, to compute what the app must return."""
    pipe = load_pipeline(_parse(["demo", *model_args]).model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def client(model_args, tmp_path_factory):
    """A client of the app launched in this process on 127.0.0.1 (closed, and its port free, afterwards); gradio's
    uploads and results go to a temporary folder."""
    port = _free_port()
    args = _parse(
        [
            "demo",
            *model_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-pixels",
            str(MAX_PIXELS),
            "--device",
            "cpu",
        ]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # read as the app is built
        app = launch(args, block=False)
        try:
            downloads = tmp_path_factory.mktemp("downloads")
            connection = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=downloads)
            try:
                yield connection
            finally:
                connection.close()
        finally:
            app.close(verbose=False)
    assert _port_is_free(port)


def _photo_file(folder: Path, size=PHOTO_SIZE, name="chelsea") -> Path:
    path = folder / f"{name}.png"
    photo(name, size).save(path)
    return path


def _upscale(client, path, outscale=4.0, color_fix="adain", tile=64):
    return client.predict(handle_file(str(path)), outscale, color_fix, tile, api_name="/upscale")


# ------------------------------------------------------------------------------------------------ through the API
@pytest.mark.parametrize("outscale, size", [(4.0, (108, 72)), (2.5, (68, 45)), (1.3, (35, 23))])
def test_photo_comes_back_at_outscale_times_its_size(client, reference, tmp_path, outscale, size):
    path = _photo_file(tmp_path)
    (bicubic_path, slider_path), download, info = _upscale(client, path, outscale)

    with PIL.Image.open(download) as output, PIL.Image.open(slider_path) as shown, PIL.Image.open(bicubic_path) as bic:
        assert output.size == shown.size == bic.size == size
        output, shown, bicubic = output.convert("RGB"), shown.convert("RGB"), bic.convert("RGB")
    assert Path(download).name == f"chelsea_tinysr_x{outscale:g}.png"
    assert f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} px" in info and f"{size[0]}x{size[1]} px" in info and " s on cpu" in info

    # What the app must show: the model's 4x output resampled with Lanczos, beside a bicubic upscale of the input.
    low_res = PIL.Image.open(path).convert("RGB")
    generator = torch.Generator().manual_seed(0)
    expected = reference(low_res, color_fix="adain", tile_size=64, tile_overlap=8, generator=generator).images[0]
    assert expected.size == (4 * PHOTO_SIZE[0], 4 * PHOTO_SIZE[1])
    if expected.size != size:
        expected = expected.resize(size, PIL.Image.Resampling.LANCZOS)
    assert _max_difference(output, expected) <= 1
    assert _max_difference(shown, output) == 0
    assert _max_difference(bicubic, low_res.resize(size, PIL.Image.Resampling.BICUBIC)) == 0


@pytest.mark.parametrize("tile", [0, 32])
def test_colour_fix_and_tile_size_reach_the_pipeline(client, reference, tmp_path, tile):
    path = _photo_file(tmp_path, TILED_SIZE, "coffee")
    _, download, _ = _upscale(client, path, 4.0, "wavelet", tile)
    low_res = PIL.Image.open(path).convert("RGB")
    generator = torch.Generator().manual_seed(0)
    expected = reference(low_res, color_fix="wavelet", tile_size=tile or None, tile_overlap=8, generator=generator)
    with PIL.Image.open(download) as output:
        assert output.size == (4 * TILED_SIZE[0], 4 * TILED_SIZE[1])
        # Exactly (same weights, same process, lossless PNG): tiled and untiled outputs of the tiny model differ by
        # only 1/255, so a tolerance would not show that the setting arrived.
        assert _max_difference(output.convert("RGB"), expected.images[0]) == 0


def _max_difference(a: PIL.Image.Image, b: PIL.Image.Image) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _bad_files(folder: Path) -> dict[str, Path]:
    png = io.BytesIO()
    photo("rocket", (30, 20)).save(png, format="PNG")  # under MAX_PIXELS
    files = {
        "text.png": b"not an image\n",
        "empty.png": b"",
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 8,
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in files}


def test_bad_files_get_a_clear_message(client, tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(AppError, match="Cannot read this file as an image") as caught:
            _upscale(client, path)
        message = str(caught.value)
        assert "Upload a PNG, JPEG" in message and "gradio" not in message, name  # no server path in it
        assert "\n" not in message


def test_too_large_input_gets_a_clear_message(client, tmp_path):
    path = _photo_file(tmp_path, TOO_LARGE_SIZE)
    with pytest.raises(
        AppError, match=r"This image is 60x51 \(3,060 pixels\), above this demo's limit of 3,000 pixels"
    ) as caught:
        _upscale(client, path)
    assert "tinysr upscale" in str(caught.value)


def test_settings_out_of_range_get_a_clear_message(client, tmp_path):
    path = _photo_file(tmp_path)
    with pytest.raises(AppError, match="output scale must be between 1 and 4"):
        _upscale(client, path, outscale=0.5)
    with pytest.raises(AppError, match="tile size must be one of"):
        _upscale(client, path, tile=33)
    with pytest.raises(AppError, match="colour fix must be one of"):
        _upscale(client, path, color_fix="histogram")


def test_no_image_gets_a_clear_message(client):
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, 4.0, "adain", 64, api_name="/upscale")


# --------------------------------------------------------------------------------------------- the command line
def _run(argv, capsys) -> tuple[int, str]:
    code = demo_module.main(argv)
    return code, capsys.readouterr().err


def test_missing_default_model_is_one_line(monkeypatch, capsys):
    from tinysr_diffusers.pipelines import TinySRPipeline

    def missing(*args, **kwargs):
        raise FileNotFoundError("No such folder: /site-packages/tinysr_diffusers/default_model")

    monkeypatch.setattr(TinySRPipeline, "from_pretrained", missing)
    code, err = _run([], capsys)
    assert code == 2
    assert err.startswith("error: cannot load the default model") and err.count("\n") == 1
    assert "No such folder" in err and "pass --model PATH_OR_REPO" in err


def test_bad_model_is_one_line(tmp_path, capsys):
    code, err = _run(["--model", str(tmp_path / "no_such_model")], capsys)
    assert code == 2
    assert err.startswith(f"error: cannot load --model {tmp_path / 'no_such_model'}: ") and err.count("\n") == 1


def test_without_gradio_is_one_line(monkeypatch, model_args, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    code, err = _run(model_args, capsys)
    assert code == 2
    assert err.startswith("error: `tinysr demo` needs gradio") and INSTALL_HINT in err and err.count("\n") == 1


def test_parser_does_not_import_gradio():
    script = (
        "import argparse, sys\n"
        "from tinysr_diffusers.demo import add_demo_parser\n"
        "parser = argparse.ArgumentParser()\n"
        "add_demo_parser(parser.add_subparsers())\n"
        "args = parser.parse_args(['demo', '--port', '8000', '--share'])\n"
        "assert args.port == 8000 and args.share and args.model is None and args.host == '127.0.0.1'\n"
        "assert 'gradio' not in sys.modules, 'gradio imported by the parser'\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("GRADIO_SERVER_")}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------- a real browser
def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def space_app(model_args, tmp_path):
    """The Space's app.py, as a Space runs it (a subprocess), serving on 127.0.0.1; stopped afterwards."""
    port = _free_port()
    env = {
        **os.environ,
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": str(REPO),
    }
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(SPACE_APP), *model_args, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{(tmp_path / 'app.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer within 240 s:\n{(tmp_path / 'app.log').read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        log.close()
    assert _port_is_free(port)


@pytest.fixture
def browser():
    """Headless Chromium through chromedriver (both from Debian), quit afterwards."""
    _require("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


@pytest.mark.slow
def test_in_a_real_browser(space_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    example = REPO / "tinysr_diffusers" / "demo_examples" / "chelsea.png"
    with PIL.Image.open(example) as image:
        expected = tuple(round(2.5 * side) for side in image.size)  # (400, 300)
    wait = WebDriverWait(browser, 180, poll_frequency=0.25)

    browser.get(space_app)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#tinysr-input input[type=file]"))
    upload.send_keys(str(example))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tinysr-input img"))  # the preview of the upload
    scale = browser.find_element(By.CSS_SELECTOR, "#tinysr-outscale input[type=number]")
    scale.send_keys(Keys.CONTROL, "a")
    scale.send_keys("2.5", Keys.TAB)
    wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#tinysr-outscale input[type=range]").get_attribute("value") == "2.5"
    )
    browser.find_element(By.ID, "tinysr-run").click()

    def slider_images(driver):
        images = driver.find_elements(By.CSS_SELECTOR, "#tinysr-slider img")
        sizes = [
            driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
            for image in images
            if "/file=" in (image.get_attribute("src") or "")
        ]
        return sizes if len(sizes) == 2 and all(width > 0 for width, _ in sizes) else None

    sizes = wait.until(slider_images)
    assert [tuple(size) for size in sizes] == [expected, expected]  # bicubic | TinySR, both at the output size
    link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#tinysr-download a[data-testid=download-link]"))
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
        downloaded = response.read()
    with PIL.Image.open(io.BytesIO(downloaded)) as output:
        assert output.size == expected and output.format == "PNG"
    info = browser.find_element(By.ID, "tinysr-info").text
    assert "160x120 px" in info and "400x300 px" in info

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "demo.png"
    assert browser.save_screenshot(str(screenshot))
    if os.environ.get("TINYSR_DEMO_SCREENSHOT"):  # e.g. docs/images/demo.png, the README's
        shutil.copyfile(screenshot, os.environ["TINYSR_DEMO_SCREENSHOT"])
