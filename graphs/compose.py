"""Composition example: the VPT graph as a subgraph node of a bigger StateGraph.

A "look" node (the whole VPT graph) answers the question; a plain "report" node then uses its
answer and the regions it looked at. Run it: ``python graphs/compose.py IMAGE QUESTION``.
"""
from __future__ import annotations

import sys
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from vpt_agent import build_graph


class ReportState(TypedDict, total=False):
    image: Any
    q: str
    answer: str
    regions: list
    report: str


def write_report(state: ReportState) -> dict[str, str]:
    looked = f" (looked closer at {len(state['regions'])} region(s))" if state.get("regions") else ""
    return {"report": f"Q: {state['q']}\nA: {state['answer']}{looked}"}


def build_report_graph(vpt_graph: CompiledStateGraph | None = None) -> CompiledStateGraph:
    """START -> look (the VPT graph) -> report -> END."""
    builder = StateGraph(ReportState)
    builder.add_node("look", vpt_graph if vpt_graph is not None else build_graph())
    builder.add_node("report", write_report)
    builder.add_edge(START, "look")
    builder.add_edge("look", "report")
    builder.add_edge("report", END)
    return builder.compile()


if __name__ == "__main__":
    print(build_report_graph().invoke({"image": sys.argv[1], "q": sys.argv[2]})["report"])
