from fastapi import APIRouter

from server.api.routes import admin, chat, conversations, health, sessions, users

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(sessions.router)
api_router.include_router(chat.router)
api_router.include_router(users.router)
api_router.include_router(conversations.router)
api_router.include_router(admin.router)
