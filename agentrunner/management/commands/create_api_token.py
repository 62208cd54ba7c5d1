from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token

from common.schema import require_schema


class Command(BaseCommand):
    help = "Create the user if needed and print its API token (Authorization: Token <key>)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--staff",
            action="store_true",
            help="Make the user staff: an operator who defines repositories, warms pools, leases slots, sees every "
            "task and artifact and uses the admin.",
        )
        parser.add_argument("--superuser", action="store_true", help="Make the user a superuser.")

    def handle(self, *args, username, staff, superuser, **options):
        require_schema()
        user, created = get_user_model().objects.get_or_create(username=username)
        if staff or superuser:
            user.is_staff = True
            user.is_superuser = user.is_superuser or superuser
            user.save()
        token, _ = Token.objects.get_or_create(user=user)
        if created:
            self.stderr.write(f"created user {username}")
        self.stdout.write(token.key)
