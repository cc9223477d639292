"""Look at a job's MLflow pages as a user does, in Debian's headless Chromium (driven by Playwright): the run's
model-metrics tab must show every logged picture key rendered at its latest step, and the run, system
metrics, model version and registered model pages must load. Screenshots go to `--out`.

    .venv/bin/python scripts/ui_check.py --mlflow http://127.0.0.1:5000 --run RUN_ID --model NAME/VERSION \
        --out docs/images/mlflow

Exit 0 when every check holds; otherwise it prints what failed. `tests/jobs/test_mlflow_ui.py` runs the same
checks on the test suite's job.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# no background networking: the machine's closed network refuses Chromium's update and sync calls
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SETTLE_MS = 2500
PICTURE_KEYS = ("images/reconstructions", "codebook/usage", "codebook/projection")


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    seen: dict[str, object] = field(default_factory=dict)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


def image_steps(mlflow_url: str, run_id: str) -> dict[str, list[int]]:
    """{key: sorted steps} of the run's images logged with `log_image(key=..., step=...)`."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_url)
    out: dict[str, set[int]] = {}
    for info in client.list_artifacts(run_id, "images"):
        name = info.path.split("/", 1)[-1]
        if "+step+" not in name or not name.endswith(".png"):  # MLflow names them key+step+N+timestamp+T+uuid
            continue
        key = name.split("+step+", 1)[0].replace("~", "/")  # and writes '/' in a key as '~'
        out.setdefault(key, set()).add(int(name.split("+step+", 1)[1].split("+", 1)[0]))
    return {k: sorted(v) for k, v in out.items()}


def check_pages(mlflow_url: str, run_id: str, model: str | None, out: Path | None,
                keys: tuple[str, ...] = PICTURE_KEYS, timeout_ms: int = 60_000) -> Report:
    """Open the pages and check them; screenshots into `out` when given."""
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    report = Report()
    base = mlflow_url.rstrip("/")
    run = MlflowClient(mlflow_url).get_run(run_id)
    exp = run.info.experiment_id
    all_steps = image_steps(mlflow_url, run_id)
    steps = {k: v[-1] for k, v in all_steps.items()}  # the latest step of each key
    report.seen["image_steps"] = steps
    for key in keys:
        report.check(key in steps, f"no picture logged under {key!r} (found {sorted(steps)})")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str) -> None:
        if out is not None:
            path = out / f"{name}.png"
            page.screenshot(path=str(path), full_page=True)
            report.screenshots.append(str(path))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(timeout_ms)
            # the run page, as the link a job prints opens it
            page.goto(f"{base}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning")
            page.get_by_text(run.info.run_name or run_id).first.wait_for()
            page.wait_for_timeout(SETTLE_MS)  # MLflow polls: the network never idles
            _close_assistant(page)
            body = page.inner_text("body")
            report.check("Model metrics" in body and "Token usage" not in body, "the run page opened in the GenAI view")
            for label, tag in (("Created by", "mlflow.user"), ("Source", "mlflow.source.name")):
                value = run.data.tags.get(tag, "")
                report.check(bool(value) and value.split()[0] in body, f"{label}: {tag}={value!r} not on the run page")
            datasets = run.inputs.dataset_inputs if run.inputs else []
            report.check(bool(datasets), "the run has no dataset inputs")
            if datasets:  # the page lists the first and "+N" for the others
                report.check(datasets[0].dataset.name in body, f"dataset {datasets[0].dataset.name!r} not shown")
                report.check(len(datasets) == 1 or f"+{len(datasets) - 1}" in body, "the other datasets not shown")
            shot(page, "run-overview")

            # the pictures, one key at a time (MLflow renders only the cards in view): each card opens on a
            # picture (step 0: MLflow's image cards open there), and its slider reaches the latest step's picture
            page.goto(f"{base}/#/experiments/{exp}/runs/{run_id}/model-metrics?workflowType=machine_learning")
            search = page.get_by_placeholder("Search metric charts")
            search.wait_for()
            for key in (k for k in keys if k in steps):
                search.fill(key)  # leaves the picture sections (and hides the metric charts above them)
                title = page.get_by_text(key, exact=True).first
                title.wait_for()
                card = title.locator("xpath=ancestor::div[.//input[@type='number']][1]")
                card.scroll_into_view_if_needed()
                page.wait_for_timeout(SETTLE_MS)
                report.check("No image logged at this step" not in card.inner_text(),
                             f"{key}: the card opened on a step without a picture")
                _rendered(page, {key: 0}, report)
                slider = card.get_by_role("slider").first  # its arrow keys step from one logged step to the next
                slider.focus()
                for _ in all_steps[key][1:]:
                    slider.press("ArrowRight")
                    page.wait_for_timeout(300)
                report.check(slider.get_attribute("aria-valuenow") == str(steps[key]),
                             f"{key}: the slider does not reach step {steps[key]}")
                page.wait_for_timeout(SETTLE_MS)
                _rendered(page, {key: steps[key]}, report)
                shot(page, "picture-" + key.replace("/", "-"))
                if key == "images/reconstructions":
                    _enlarged(page, card, key, all_steps[key], report, shot)
            search.fill("")
            page.wait_for_timeout(SETTLE_MS)
            shot(page, "run-model-metrics")

            page.goto(f"{base}/#/experiments/{exp}/runs/{run_id}/system-metrics?workflowType=machine_learning")
            search = page.get_by_placeholder("Search metric charts")
            search.fill("system/")  # the picture sections stay on every tab, above the system charts
            page.wait_for_timeout(SETTLE_MS)
            cpu = page.get_by_text("cpu_utilization_percentage").first
            for _ in range(20):  # MLflow renders a section once it scrolls into view
                if cpu.count() and cpu.is_visible():
                    break
                page.mouse.move(700, 600)
                page.mouse.wheel(0, 600)
                page.wait_for_timeout(400)
            report.check(cpu.count() > 0, "no system/cpu_utilization_percentage chart")
            if cpu.count():
                cpu.scroll_into_view_if_needed()
            page.wait_for_timeout(SETTLE_MS)
            shot(page, "run-system-metrics")

            if model:
                name, version = model.rsplit("/", 1)
                page.goto(f"{base}/#/models/{name}/versions/{version}?workflowType=machine_learning")
                page.get_by_text(f"Version {version}").first.wait_for()
                page.wait_for_timeout(SETTLE_MS)  # MLflow polls: the network never idles
                page.wait_for_timeout(1000)
                vbody = page.inner_text("body")
                report.check("images" in vbody and "codes" in vbody, "the version page shows no signature")
                report.check("Evaluations" in vbody or "model card" in vbody.lower() or "Turns" in vbody,
                             "the version page shows no description")
                shot(page, "model-version")
                page.goto(f"{base}/#/models/{name}?workflowType=machine_learning")
                page.get_by_text(name).first.wait_for()
                page.wait_for_timeout(SETTLE_MS)  # MLflow polls: the network never idles
                page.wait_for_timeout(1000)
                mbody = page.inner_text("body")
                report.check("vqmodels" in mbody, "the registered model page has no description")
                shot(page, "registered-model")
        finally:
            browser.close()
    return report


def _enlarged(page, card, key: str, steps: list[int], report: Report, shot) -> None:
    """The card full screen at its latest step, then its picture clicked open: MLflow shows a 256 px thumbnail
    in cards, the logged (enlarged, labelled) picture only in this view."""
    card.locator("button").first.click()  # the card's full-screen button
    page.wait_for_timeout(SETTLE_MS)
    slider = page.get_by_role("dialog").get_by_role("slider").last  # the full-screen view's
    slider.focus()
    for _ in steps[1:]:  # from wherever the card was left (past the last step the slider shows nothing)
        if slider.get_attribute("aria-valuenow") == str(steps[-1]):
            break
        slider.press("ArrowRight")
        page.wait_for_timeout(300)
    page.wait_for_timeout(SETTLE_MS)
    page.get_by_role("dialog").locator("img").last.click()  # the full-screen view's picture
    page.wait_for_timeout(SETTLE_MS)
    full = page.evaluate(
        "() => Array.from(document.images).filter(i => i.complete && i.naturalWidth > 256 && "
        "!i.src.includes('compressed')).map(i => decodeURIComponent(i.src))")
    want = f"{key.replace('/', '~')}+step+{steps[-1]}+"
    report.check(any(want in f for f in full), f"{key}: the full-size picture of step {steps[-1]} does not open")
    shot(page, "picture-enlarged")
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its chat assistant on a browser's first visit; it covers a third of the page."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def _rendered(page, want: dict[str, int], report: Report) -> bool:
    """True when, for every key, an image of that key at that step has loaded in the page."""
    rendered = page.evaluate(
        "() => Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => decodeURIComponent(i.src))")
    report.seen.setdefault("rendered", []).extend(r.rsplit("path=", 1)[-1][:90] for r in rendered)
    missing = [k for k, step in want.items() if not any(f"{k.replace('/', '~')}+step+{step}+" in r for r in rendered)]
    if missing:
        report.failures.append(f"not rendered: {missing} at steps {[want[k] for k in missing]}")
    return not missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlflow", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--model", help="NAME/VERSION of the model the run registered")
    p.add_argument("--out", type=Path)
    p.add_argument("--keys", default=",".join(PICTURE_KEYS), help="picture keys that must render")
    a = p.parse_args(argv)
    report = check_pages(a.mlflow, a.run, a.model, a.out, tuple(k for k in a.keys.split(",") if k))
    print(json.dumps({"failures": report.failures, "screenshots": report.screenshots, "seen": report.seen}, indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
