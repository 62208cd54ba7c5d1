from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path
from django.views.generic import RedirectView

from inspector import views

app_name = "inspector"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="inspector:runs"), name="home"),
    path("runs/", views.run_list, name="runs"),
    path("runs/dashboard/", views.dashboard, name="dashboard"),
    path("runs/<uuid:task_id>/", views.run_detail, name="run"),
    path("runs/<uuid:task_id>/events/", views.run_events, name="run-events"),
    path("runs/<uuid:task_id>/cancel/", views.run_cancel, name="run-cancel"),
    path("runs/<uuid:task_id>/retry/", views.run_retry, name="run-retry"),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
