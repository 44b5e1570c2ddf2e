"""The README is the front door (what it is, the two commands, a short tour, links); the reference lives in
docs/, and every link between them leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6} (.*)$", line)):
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_the_readme_is_the_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 400
    assert "scripts/demo.sh     #" in text and "scripts/test.sh     #" in text  # the two commands, as .ci/run runs the second
    for section in ("## Two commands", "## A short tour", "## Documentation", "## Dependencies", "## Development"):
        assert section in text
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"the README links to every reference page: {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, file:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target} leads nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: {target}: no such heading in {dest.name}"


def test_the_reference_moved_out_of_the_readme_is_all_there() -> None:
    """A sample of facts from each part of the reference, each found in the page that now holds it."""
    facts = {
        "gateway.md": ["least_outstanding", "route_not_allowed", "idle_read_timeout_seconds"],
        "access.md": ["client_credentials", "expires_in", "Fernet"],
        "models.md": ["pre_start_actions", "cache_max_bytes", "VLLM_CPU_KVCACHE_SPACE", "scripts/setup.sh --with-vllm"],
        "backendai.md": ["write_tempfile", "initial_delay"],
        "replicas.md": ["cgroup.kill", "unhealthy_replace_after"],
        "scaling.md": ["autoscaling_policy", "wake_timeout_seconds", "INFERENCE_FRAMEWORK"],
        "configuration.md": ["APPLIANCE_CONFIG", "[retention]", "continuous_batching"],
        "api.md": ["/api/v1/openapi.json", "appliance_requests_total", "event: verdict"],
        "console.md": ["X-CSRF-Token"],
        "cli.md": ["appliance endpoint token create", "appliance tls init"],
        "operations.md": ["Type=notify", "test_fault_kill9.py", "appliance doctor"],
    }
    for page, needles in facts.items():
        text = (ROOT / "docs" / page).read_text()
        for needle in needles:
            assert needle in text, f"docs/{page} lacks {needle!r}"
