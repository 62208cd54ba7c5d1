import uuid

from django.db import migrations, models


def distinct_tokens_for_running(apps, schema_editor):
    # AddField gives every existing row the same default; an attempt still running gets its own.
    Attempt = apps.get_model("registry", "Attempt")
    for attempt_id in Attempt.objects.filter(outcome="running").values_list("pk", flat=True):
        Attempt.objects.filter(pk=attempt_id).update(lease_token=uuid.uuid4())


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0004_task_test_results"),
    ]

    operations = [
        migrations.AddField(
            model_name="attempt",
            name="lease_token",
            field=models.UUIDField(default=uuid.uuid4, editable=False),
        ),
        migrations.RunPython(distinct_tokens_for_running, migrations.RunPython.noop),
    ]
