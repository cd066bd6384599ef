"""scratchoff — interactive lab for quantization-aware training and the Lottery Ticket Scratcher.

Run with:  streamlit run app/scratchoff_app.py      (from any folder: app/.streamlit/config.toml binds localhost)
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

import common as C  # noqa: E402

st.set_page_config(page_title="scratchoff", page_icon=str(APP_DIR / "static" / "favicon.png"), layout="wide")
C.refuse_if_exposed()


@st.cache_resource
def keep_freed_memory() -> bool:
    """Once per server: glibc keeps freed blocks for reuse (`lts_core.malloc`), as the training CLI does. The
    streamed analysis of a big run allocates and frees its buffers task after task; with glibc's defaults they
    are page-faulted in afresh each time (0–28 % of its CPU on a 100M-weight run, BENCHMARKS.md)."""
    from lts_core.malloc import keep_freed_memory as keep
    return keep()


keep_freed_memory()

PAGES_DIR = APP_DIR / "app_pages"
pages = {
    "runs": st.Page(PAGES_DIR / "runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
    "settling": st.Page(PAGES_DIR / "settling.py", title="Settling", icon=":material/grid_view:", url_path="settling"),
    "distributions": st.Page(PAGES_DIR / "distributions.py", title="Distributions", icon=":material/bar_chart:",
                             url_path="distributions"),
    "sweep": st.Page(PAGES_DIR / "sweep.py", title="Threshold sweep", icon=":material/tune:", url_path="sweep"),
    "trajectories": st.Page(PAGES_DIR / "trajectories.py", title="Trajectories", icon=":material/show_chart:",
                            url_path="trajectories"),
    "train": st.Page(PAGES_DIR / "train.py", title="Train", icon=":material/play_circle:", url_path="train"),
    "compare": st.Page(PAGES_DIR / "compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    "learn": st.Page(PAGES_DIR / "learn.py", title="Learn", icon=":material/school:", url_path="learn"),
}


def home() -> None:
    """The root URL opens the Runs page at its own address (/runs), keeping any query parameters."""
    st.switch_page(pages["runs"], query_params=st.query_params.to_dict())


C.register_pages(pages)
nav = st.navigation({"": [st.Page(home, title="Home", url_path="home", default=True, visibility="hidden")],
                     "Explore": [pages[k] for k in ("runs", "settling", "distributions", "sweep", "trajectories",
                                                    "compare")],
                     "Do": [pages["train"], pages["learn"]]})

with st.sidebar:
    st.caption(f"Runs folder: {C.plain(C.runs_folder())}")
    if st.button("Refresh run list", help="Re-read the runs folder now (the Runs page also checks it every few "
                                          "seconds)"):
        C.refresh_runs()

C.mark_script_activity()
try:
    nav.run()
finally:
    C.mark_script_activity()
C.warm_up()   # after the first page: what the other pages import, in the background
