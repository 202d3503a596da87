"""What a run leaves for people: progress lines, trackers, model export, summary files, report,
claims and sweep reports. Fed by the game's phase events."""
