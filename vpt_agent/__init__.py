"""vpt-agent: Visual Perception Tokens for Qwen2-VL as a LangGraph state machine."""
