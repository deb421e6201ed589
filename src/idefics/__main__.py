from idefics.cli import main

raise SystemExit(main())
