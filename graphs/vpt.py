"""The VPT graph with the bundled demo model, as `langgraph dev` serves it (see ../langgraph.json; run
it from the repository root). The server gives the graph its checkpointer and store.

Inputs arrive as JSON there: give the image as a data:image URL or a file path on the server.
"""
from vpt_agent import build_graph

graph = build_graph()
