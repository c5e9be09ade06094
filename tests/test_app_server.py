"""The studio served for real on a free local port: an API client and a headless browser drive it."""

import contextlib
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from shira_diffusion.app.studio import NONE, Studio, build_ui, demo_label
from shira_diffusion import find_targets
from shira_diffusion.testing import free_port, random_adapter, tiny_sdxl_pipeline

FUSE_OFF = ["", 1.0] * 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    studio = Studio(tiny_sdxl_pipeline(seed=0), demo_label(), max_bytes=2 * 2**20)
    weights = find_targets(studio.pipe)
    random_adapter(weights, "rand", density=0.05, seed=1, std=0.3).save(folder / "a.safetensors")
    random_adapter(weights, "wm", density=0.05, seed=2, std=0.3).save(folder / "b.safetensors")
    studio.scan(folder)
    yield from serve(studio)


def serve(studio):
    """The studio's page on a free local port for the module's tests: ``(studio, url)``."""
    page = build_ui(studio)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield studio, f"http://127.0.0.1:{port}/"
    page.close()


def generate_args(mode="swap", swap=NONE, scale=1.0, fuse=FUSE_OFF + ["", 1.0], seed=0, sampler="model default", count=1, size=1,
                  swap_te="", fuse_te=("",) * 4, prompt="a red square"):
    return [prompt, "", seed, 2, 5.0, 64, 64, sampler, count, size, mode, swap, scale, swap_te, *fuse, *fuse_te]


def pixels(path):
    return list(Image.open(path).convert("RGB").getdata())


def active_in(table) -> list[str]:
    return [row[0] for row in table["data"] if row[8] == "yes"]


def test_api_generates_in_swap_and_fuse_modes(served):
    from gradio_client import Client

    studio, url = served
    client = Client(url, verbose=False)
    base_path, status, table, _ = client.predict(*generate_args(), api_name="/generate")
    assert status.startswith("base model: switch") and active_in(table) == []
    a_path, status, table, _ = client.predict(*generate_args(swap="a"), api_name="/generate")
    assert status.startswith("a x1: switch") and active_in(table) == ["a"]  # the Library follows each generation
    fused_path, status, table, _ = client.predict(*generate_args(mode="fuse", fuse=["a", 1.0, "b", 0.5, "", 1.0, "", 1.0]), api_name="/generate")
    assert status.startswith("a x1 + b x0.5: switch") and active_in(table) == ["a", "b"]
    assert studio.switcher.get_active_adapters() == ["a", "b"]
    assert pixels(base_path) != pixels(a_path) != pixels(fused_path)


def test_fuse_slots_filled_in_swap_mode_are_reported(served):
    from gradio_client import Client

    path, status, _, _ = Client(url := served[1], verbose=False).predict(
        *generate_args(swap="b", fuse=["a", 1.0, "", 1.0, "", 1.0, "", 1.0]), api_name="/generate")
    assert status.startswith("b x1: switch") and "fuse slots ignored (a): Mode is *swap*" in status, url


def test_api_upload_of_a_bad_file_changes_nothing(served, tmp_path):
    import tempfile

    from gradio_client import Client, handle_file

    studio, url = served
    before = studio.library_rows()
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(b"\x80\x04 pickled payload")
    result = Client(url, verbose=False).predict(handle_file(str(bad)), "", api_name="/upload")
    assert "rejected evil.safetensors" in result[-1] and "not a readable safetensors file" in result[-1]
    assert tempfile.gettempdir() not in result[-1] and "gradio" not in result[-1]  # no server-side temp path
    assert studio.library_rows() == before


def test_api_upload_of_a_taken_name_renames_or_takes_a_given_name(served, tmp_path):
    from gradio_client import Client, handle_file

    studio, url = served
    random_adapter(find_targets(studio.pipe), "rand", density=0.05, seed=9).save(tmp_path / "a.safetensors")
    client = Client(url, verbose=False)
    assert client.predict(handle_file(str(tmp_path / "a.safetensors")), "", api_name="/upload")[-1] == "loaded **a-2** (*a* was taken)"
    assert client.predict(handle_file(str(tmp_path / "a.safetensors")), "mine", api_name="/upload")[-1] == "loaded **mine**"
    assert studio.adapters == ["a", "b", "a-2", "mine"]
    studio.remove("a-2")
    studio.remove("mine")


def test_concurrent_tabs_each_get_their_own_adapters(served):
    from gradio_client import Client

    _, url = served
    requests = [generate_args(), generate_args(swap="a"), generate_args(swap="b"),
                generate_args(mode="fuse", fuse=["a", 1.0, "b", 1.0, "", 1.0, "", 1.0])]
    alone = [pixels(Client(url, verbose=False).predict(*r, api_name="/generate")[0]) for r in requests]

    def run(i):
        return i, pixels(Client(url, verbose=False).predict(*requests[i % 4], api_name="/generate")[0])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(12)))
    assert all(image == alone[i % 4] for i, image in results)


def test_browser_clicks_generate_and_sees_an_image(served, tmp_path):
    studio, url = served
    with studio_page(url) as page:
        assert page.input_value("#prompt textarea") == studio.example
        assert page.is_checked("#mode input[value='swap']")
        page.get_by_text("Fuse: adapters and weights").click()
        page.click("#fuse-1 input")
        page.locator("#fuse-1").get_by_role("option", name="a", exact=True).click()  # picking a fuse slot switches the mode to fuse
        page.wait_for_function("document.querySelector(\"#mode input[value='fuse']\").checked", timeout=10_000)
        page.get_by_role("tab", name="Library").click()
        assert page.input_value("#remove-name input", timeout=10_000) == ""  # nothing pre-selected for removal
        page.get_by_role("tab", name="Generate").click()
        page.check("#mode input[value='swap']")
        page.click("#generate")
        page.wait_for_selector("#result img", timeout=120_000)
        page.wait_for_function("document.querySelector('#status') && document.querySelector('#status').innerText.includes('switch')",
                               timeout=60_000)
        shot = tmp_path / "studio.png"
        page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] > 300


@pytest.fixture(scope="module")
def demo_served():
    from shira_diffusion.app.studio import load_pipeline
    from shira_diffusion.demo.model import ADAPTERS_DIR

    pipe, notes = load_pipeline("demo")
    studio = Studio(pipe, **notes, allow_uploads=False)
    studio.scan(ADAPTERS_DIR)
    yield from serve(studio)


def pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in the dropdown ``#elem_id`` (its own option list, not another's)."""
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()


@contextlib.contextmanager
def studio_page(url: str):
    """A headless Chromium page on the studio at ``url``, once its Generate button is there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60_000)
            yield page
        finally:
            browser.close()


def _browser(p):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser test needs Chromium: apt-get install chromium (.ci/run installs it)"
    return p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                                             "--disable-background-networking", "--disable-component-update",
                                                             "--disable-sync", "--no-first-run"])


BOTH = "a sks shape on a gray background, in the center, in bluefire style"  # both demo concepts' triggers


def test_browser_tour_png_info_gallery_xy_and_compare(demo_served, tmp_path):
    """An artist's session on the demo model, in the browser: a random seed, reused; the session
    gallery; the PNG read back into the controls; an X/Y plot; a comparison. Screenshots go to
    $SHIRA_SCREENSHOTS when set (the README's tour), else to a temporary folder."""
    import os
    from pathlib import Path

    from shira_diffusion.app.pnginfo import read_parameters

    studio, url = demo_served
    shots = Path(os.environ.get("SHIRA_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with studio_page(url) as page:
        page.fill("#prompt textarea", "a red star on a white background, in the center, in bluefire style")  # the style's trigger
        page.fill("#seed input", "-1")
        pick(page, "sampler", "Euler a")
        pick(page, "swap-name", "bluefire-shira-wm")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status') && document.querySelector('#status').innerText.includes('seed')",
                               timeout=120_000)
        status = page.inner_text("#status")
        assert status.startswith("bluefire-shira-wm x1: switch")
        used = int(status.split("seed ")[1].split()[0])
        page.wait_for_selector("#history img", timeout=30_000)
        page.wait_for_timeout(1000)
        page.click("#reuse-seed")
        page.wait_for_function(f"document.querySelector('#seed input').value === '{used}'", timeout=10_000)
        page.screenshot(path=str(shots / "generate.png"), full_page=True)

        src = page.get_attribute("#result img", "src")
        png = tmp_path / "result.png"
        png.write_bytes(page.request.get(src).body())
        params = read_parameters(png)
        assert params["seed"] == used and params["sampler"] == "Euler a" and params["adapters"][0]["name"] == "bluefire-shira-wm"

        page.fill("#prompt textarea", "something else")
        page.get_by_role("tab", name="PNG info").click()
        page.set_input_files("#png-drop input[type=file]", str(png))
        page.wait_for_function("document.querySelector('#png-text') && document.querySelector('#png-text').innerText.includes('Steps:')",
                               timeout=30_000)
        page.click("#png-send")
        page.wait_for_function("document.querySelector('#png-status').innerText.includes('Sent to Generate')", timeout=30_000)
        page.screenshot(path=str(shots / "png_info.png"), full_page=True)
        page.get_by_role("tab", name="Generate").click()
        assert page.input_value("#prompt textarea") == params["prompt"]
        assert page.input_value("#seed input") == str(used)

        page.get_by_role("tab", name="X/Y plot").click()
        page.fill("#xy-prompt textarea", BOTH)
        pick(page, "x-adapter", "bluefire-shira-rand")
        pick(page, "y-axis", "sks-shira-rand")
        page.fill("#x-values textarea", "0, 1")
        page.fill("#y-values textarea", "0, 1")
        page.click("#xy-plot")
        page.wait_for_selector("#xy-grid img", timeout=120_000)
        page.wait_for_function("document.querySelector('#xy-table').innerText.includes('kept:bluefire-shira-rand')", timeout=30_000)
        page.wait_for_timeout(1500)  # the images fade in
        page.screenshot(path=str(shots / "xy_plot.png"), full_page=True)

        page.get_by_role("tab", name="Compare").click()
        lora_labels = page.locator("#compare-lora label").all_inner_texts()
        assert lora_labels and all("lora" in t for t in lora_labels)  # LoRA counterparts: LoRA adapters only
        page.fill("#compare-prompt textarea", BOTH)
        page.locator("#compare-adapters label", has_text="bluefire-shira-rand").click()
        page.locator("#compare-adapters label", has_text="sks-shira-rand").click()
        page.locator("#compare-lora label", has_text="bluefire-lora").click()
        page.locator("#compare-lora label", has_text="sks-lora").click()
        page.fill("#compare-seeds textarea", "0, 1")
        page.click("#compare-button")
        page.wait_for_function("document.querySelector('#compare-report').innerText.includes('demo detector')", timeout=120_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "compare.png"), full_page=True)


def test_api_errors_are_the_studio_sentence_not_a_generic_error(served):
    from gradio_client import Client

    _, url = served
    client = Client(url, verbose=False)
    for args, sentence in ((generate_args(seed=None), "The seed is empty: enter a number, or -1 for a random seed."),
                           (generate_args(prompt="a cat <lora:zzz:1>"), "Bad prompt: <lora:zzz> names no loaded adapter")):
        with pytest.raises(Exception) as err:
            client.predict(*args, api_name="/generate")
        assert sentence in str(err.value)


def test_generations_comparisons_and_plots_share_one_queue_of_one(served):
    studio, _ = served
    page = build_ui(studio)
    fns = {f.api_name: f for f in page.fns.values()}
    engine = [fns[name] for name in ("generate", "img2img", "inpaint", "compare", "xy_plot")]
    assert all(f.concurrency_id == "engine" and f.concurrency_limit == 1 and f.queue for f in engine)
    assert fns["cancel"].queue is False  # never waits behind the generation it stops


def test_browser_batch_cancel_and_img2img(demo_served, tmp_path):
    """Batch size, Cancel and the img2img tab, clicked in the browser."""
    from shira_diffusion.demo import world

    _, url = demo_served
    start = tmp_path / "start.png"
    world.render(world.Scene("star", "red", "white", "in the center")).save(start)
    with studio_page(url) as page:
        page.fill("#seed input", "7")
        page.fill("#batch-size input[type=number]", "2")
        page.press("#batch-size input[type=number]", "Enter")
        page.fill("#steps input[type=number]", "4")
        page.press("#steps input[type=number]", "Enter")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').innerText.includes('seeds 7-8')", timeout=120_000)
        page.wait_for_function("document.querySelectorAll('#history img').length >= 2", timeout=30_000)

        page.fill("#steps input[type=number]", "100")  # a long run (8 batches of 2 x 100 steps) to stop
        page.press("#steps input[type=number]", "Enter")
        page.fill("#batch-count input[type=number]", "8")
        page.press("#batch-count input[type=number]", "Enter")
        page.click("#generate")
        page.wait_for_timeout(1500)
        page.click("#cancel")
        page.wait_for_function("document.querySelector('#status').innerText.includes('Cancelled after step')", timeout=120_000)

        page.get_by_role("tab", name="img2img").click()
        page.set_input_files("#img2img-image input[type=file]", str(start))
        page.wait_for_selector("#img2img-image img", timeout=30_000)
        page.click("#img2img-generate")
        page.wait_for_selector("#img2img-result img", timeout=120_000)
        page.wait_for_function("document.querySelector('#img2img-status').innerText.includes('switch')", timeout=30_000)
