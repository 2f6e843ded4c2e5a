"""The docs work as written: every Python snippet runs, every quoted error message is the real one, and the
built site loads nothing from another host."""

import html.parser
import math
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import Warp

import fwdtrans

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "<!-- skip-snippet -->"  # on the line before a ```python block that is not meant to run
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def snippets(page: Path) -> list[tuple[int, str]]:
    """The page's ```python blocks, in order, as ``(line, code)``, less those marked with ``SKIP``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        if m["lang"] == "python" and before != SKIP:
            out.append((text.count("\n", 0, m.start()) + 2, textwrap.dedent(m["body"])))
    return out


# pages whose snippets fail today, with why: strict, so that the fix is noticed
FAILING: dict[str, str] = {}  # page -> why its snippets cannot run as written


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.xfail(reason=FAILING[p.name], strict=True))
                                  if p.name in FAILING else p for p in PAGES if snippets(p)], ids=lambda p: p.name)
def test_snippets_run_as_written(page, tmp_path, monkeypatch):
    """Each page's blocks run in order, in one namespace, in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"snippets_{page.stem}")  # a real module, as a script's: torch.fx looks functions up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    dtype = torch.get_default_dtype()
    try:
        for line, code in snippets(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            try:
                exec(compile(code, where, "exec"), module.__dict__)
            except Exception as e:
                raise AssertionError(f"the snippet at {where} fails: {type(e).__name__}: {e}") from e
    finally:
        torch.set_default_dtype(dtype)  # a page may switch to float64


# ----------------------------------------------------------------------------- the built site is self-contained
class _Loads(html.parser.HTMLParser):
    """What a page loads: ``src`` of any tag, ``href`` of ``<link>`` (``<a href>`` is a link, not a load),
    ``srcset``, ``data`` of ``<object>``, and ``url(...)``/``@import`` in styles."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self._style = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [a[k] for k in ("src", "data") if a.get(k)]
        self.urls += [u.split()[0] for u in (a.get("srcset") or "").split(",") if u.strip()]
        if tag == "link" and a.get("href") and a.get("rel") != "canonical":
            self.urls.append(a["href"])
        self.urls += css_urls(a.get("style") or "")
        self._style = tag == "style"

    def handle_data(self, data):
        if self._style:
            self.urls += css_urls(data)

    def handle_endtag(self, tag):
        self._style = False


def css_urls(css: str) -> list[str]:
    return [u or v for u, v in re.findall(r"""url\(\s*['"]?([^'")\s]+)|@import\s+['"]([^'"]+)""", css)]


def foreign(url: str) -> bool:
    return re.match(r"(?i)(https?:)?//", url.strip()) is not None


def test_the_site_builds_and_loads_nothing_from_another_host(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stderr
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 10
    loads = {}
    for page in pages:
        parser = _Loads()
        parser.feed(page.read_text())
        loads[page.relative_to(site)] = parser.urls
    for sheet in site.rglob("*.css"):
        loads[sheet.relative_to(site)] = css_urls(sheet.read_text())
    remote = {str(p): [u for u in urls if foreign(u)] for p, urls in loads.items()}
    assert not {p: u for p, u in remote.items() if u}
    concepts = loads[Path("concepts/index.html")]
    assert "../javascripts/mathjax/tex-mml-chtml.js" in concepts  # the maths renders with the shipped MathJax
    assert (site / "javascripts/mathjax/tex-mml-chtml.js").is_file()
    assert (site / "javascripts/mathjax/output/chtml/fonts/woff-v2").is_dir()
    assert not list(site.rglob("*.py"))  # the hook that copies MathJax is not published


# ----------------------------------------------------------------------------- quoted error messages are real
def norm(text: str) -> str:
    """Compare messages up to layout: backticks, line breaks, torch's version and source locations."""
    text = re.sub(r"torch \d+\.\d+\S*", "torch X", text.replace("`", ""))
    return " ".join(re.sub(r"[\w./-]+\.py:\d+", "FILE:LINE", text).split())


def quoted(page: Path, prefix: str = "FwdTransError: ") -> list[str]:
    """The messages quoted in the page's ```text blocks: from a line starting with ``prefix`` to the next one."""
    out = []
    for m in FENCE.finditer(page.read_text()):
        if m["lang"] == "text":
            out += [q.strip() for q in re.split(f"^{re.escape(prefix)}", m["body"], flags=re.M)[1:]]
    return out


def raised(fn, *args, **kwargs) -> str:
    with pytest.raises(fwdtrans.FwdTransError) as error:
        fn(*args, **kwargs)
    return str(error.value)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate, self.out = nn.Linear(3, 4), Gate(), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.gate(self.fc(x)))


class Noisy(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x) if self.training else x


class Pair(nn.Module):
    def forward(self, x):
        return x, x


def mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def resnet(**kwargs):
    return fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), **kwargs)


def step(converted, x, y):
    return converted.train_step(torch.optim.SGD(converted.parameters(), lr=0.1))(x, y)


def state_dict_with_extra():
    converted = resnet(blocks=2, heads="linear")
    return converted.load_original_state_dict({**converted.original_state_dict(), "extra": torch.zeros(1)})


# every message docs/converting.md quotes in its catalogue, and how to trigger it (convert, inspect and the step
# are not this test's files: when their messages change, the catalogue changes with them)
CATALOGUE = {
    "untraceable": lambda: raised(fwdtrans.convert, Branchy(), torch.randn(2, 3), blocks=2),
    "train-eval": lambda: raised(fwdtrans.convert, nn.Sequential(nn.Linear(3, 4), Noisy(), nn.Linear(4, 2)),
                                 torch.randn(2, 3), blocks=2),
    "too-many-blocks": lambda: raised(fwdtrans.convert, mlp(), torch.randn(2, 3), blocks=5),
    "unknown-cut": lambda: raised(resnet, blocks=["layer1.0.conv1"]),
    "cut-order": lambda: raised(resnet, blocks=["layer2", "layer1"]),
    "tuple": lambda: raised(fwdtrans.convert, nn.Sequential(nn.Linear(3, 4), Pair()), torch.randn(2, 3), blocks=2),
    "feature-map": lambda: raised(fwdtrans.convert, nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)),
                                  torch.randn(2, 3, 32, 32), blocks=2),
    "cnn-head": lambda: raised(fwdtrans.convert, mlp(), torch.randn(2, 3), blocks=2, heads="cnn"),
    "head-missing": lambda: raised(resnet, blocks=["layer1.1", "layer2.1"], heads={"layer1.1": "linear"}),
    "head-key": lambda: raised(resnet, blocks=["layer1.1"], heads={"layer2.0": "linear"}),
    "head-family": lambda: raised(resnet, blocks=2, heads="resnet"),
    "forward-ad": lambda: raised(fwdtrans.convert, Warp(), torch.randn(2, 3, 4, 4), blocks=2, heads="linear"),
    "labels-range": lambda: raised(step, resnet(blocks=2, heads="linear"), torch.randn(4, 3, 32, 32),
                                   torch.tensor([0, 3, 12, 5])),
    "labels-dtype": lambda: raised(step, resnet(blocks=2, heads="linear"), torch.randn(4, 3, 32, 32), torch.zeros(4)),
    "non-finite": lambda: raised(step, resnet(blocks=2, heads="linear"), torch.full((4, 3, 32, 32), math.nan),
                                 torch.tensor([0, 1, 2, 3])),
    "method": lambda: raised(fwdtrans.convert, mlp(), torch.randn(2, 3), target="local", guess="global"),
    "state-dict": lambda: raised(state_dict_with_extra),
}
# quoted inline, in a sentence: the first line of the message
INLINE = {
    "example-inputs": lambda: raised(fwdtrans.convert, fwdtrans.models.resnet18(width=2), torch.randn(1, 2, 32, 32),
                                     blocks=2).splitlines()[0],
    "balance": lambda: raised(resnet, blocks=2, balance="time"),
}


def test_the_converting_page_quotes_the_real_error_messages():
    page = ROOT / "docs/converting.md"
    real = {name: norm(trigger()) for name, trigger in CATALOGUE.items()}
    quotes = {norm(q) for q in quoted(page)}
    assert {name: m for name, m in real.items() if m not in quotes} == {}, "stale or missing in the catalogue"
    assert quotes - set(real.values()) == set(), "quoted, but not triggered by this test: add it to CATALOGUE"
    text = norm(page.read_text())
    assert {name: m for name, m in ((n, norm(t())) for n, t in INLINE.items()) if m not in text} == {}


def test_the_methods_page_quotes_the_real_error_messages():
    text = norm((ROOT / "docs/methods.md").read_text())
    unknown = [raised(fwdtrans.Method, target="everything"), raised(fwdtrans.Method, guess="foo"),
               raised(fwdtrans.Method, tangents=0), raised(fwdtrans.convert, mlp(), torch.randn(2, 3), target="local",
                                                           guess="global")]
    rows = [dict(guess="global", target="local"), dict(tangents=2), dict(space="span", guess="gaussian"),
            dict(space="weight", guess=lambda j, h, y: h), dict(space="weight", per_sample="exact"),
            dict(streams="joint", target="local", guess="gaussian"), dict(streams="joint", space="span"),
            dict(guess="gaussian", tangents=2, aggregation="project", space="weight", granularity="joint"),
            dict(recompute=True, space="weight"), dict(space="weight", granularity="sample", streams="sequential"),
            dict(space="weight", granularity="sample", guess="gaussian", tangents=2), dict(granularity="joint"),
            dict(guess="global", engine="reference"), dict(guess="gaussian", streams="sequential", engine="reference"),
            dict(aggregation="project"), dict(space="weight", granularity="sample", guess="gaussian",
                                              aggregation="project")]
    problems = [raised(fwdtrans.Method, **row).split("): ", 1)[1].rstrip(".") for row in rows]
    x = torch.randn(4, 3)
    singular = raised(step, fwdtrans.convert(mlp(), x, blocks=2, heads="linear", space="weight", guess="gaussian",
                                             tangents=6, aggregation="project"), x, torch.tensor([0, 1, 0, 1]))
    assert [m for m in [*unknown, *problems, singular] if norm(m) not in text] == []
    assert "fwdtrans._errors.FwdTransError: " + norm(unknown[-1]) in text
    with pytest.warns(UserWarning) as warned:
        fwdtrans.convert(fwdtrans.models.resnet18(width=2), torch.randn(2, 3, 32, 32), blocks=8, heads="linear",
                         guess="gaussian", space="weight", tangents=4)
    assert "UserWarning: " + norm(str(warned[0].message)) in text


@pytest.mark.parametrize("run", sorted(p.name for p in (ROOT / "bench").glob("engines-*.json")))
def test_the_performance_page_shows_each_committed_engine_run_as_generated(run):
    """The "Both engines against backprop" tables are ``bench/engines.py --show``'s, from the committed JSON."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "engines.py"), "--show", str(ROOT / "bench" / run)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() in (ROOT / "docs" / "performance.md").read_text()
