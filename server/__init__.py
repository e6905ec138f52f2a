"""The FastAPI server: HTTP session endpoints and the chat WebSocket."""
