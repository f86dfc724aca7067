"""The VPT graph with the bundled demo model, as `langgraph dev` serves it (see langgraph.json).

Inputs arrive as JSON there: give the image as a file path on the server or a data:image URL.
"""
from vpt_agent import build_graph

graph = build_graph()
