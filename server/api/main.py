from fastapi import APIRouter

from server.api.routes import chat, health, sessions, v1_chat

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(sessions.router)
api_router.include_router(chat.router)
api_router.include_router(v1_chat.router)
