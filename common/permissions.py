"""Who may do what over the API, in one place (the table itself is in docs/security.md and
tests/security/test_permissions.py).

- Staff (operators) define what runs on the hosts: repositories, warming, slots.
- A plain user submits tasks on existing repositories and sees, cancels and retries only their
  own tasks and artifacts. Another user's task or artifact is a 404, never a 403: its existence
  is not revealed.
"""

from __future__ import annotations

from rest_framework.permissions import BasePermission


def is_staff(user) -> bool:
    return bool(user and user.is_authenticated and user.is_staff)


class IsStaff(BasePermission):
    message = "Only staff (operators) may do this."

    def has_permission(self, request, view) -> bool:
        return is_staff(request.user)
